//! The automatic merge planner: which pairs of adjacent ranges the
//! metadata leader merges on its own, decided from heartbeat figures.
//!
//! Splits only ever add shards; data that is deleted or cools down leaves
//! small idle shards behind, each costing a Raft group on three nodes. Two
//! neighbouring ranges are merged (`ops::merge`) when together their shards
//! hold less than `merge_size` bytes and serve fewer than `merge_qps`
//! requests per second, as TiKV and CockroachDB merge small ranges.
//!
//! So that splits and merges do not undo each other:
//! - neither range may have been created or cut by a split less than
//!   `cooldown` ago (a split for load leaves two halves that are small
//!   and, once the load moves, idle);
//! - the thresholds sit well below the split's (`merge_size` a quarter of
//!   `split_size` by default, `merge_qps` a tenth of `split_qps`), so the
//!   merged range is not split again at once;
//! - the boundaries of a hash-spread keyspace's buckets are kept (the
//!   buckets exist to spread writes over shards).
//!
//! Only ranges alone in their shard are merged (they carry the shard's
//! figures), at most `max_merges` at once. `merge_size` 0 turns merging
//! off. The decision ([`plan`]) is pure and tested on its own;
//! [`super::run::auto_merge`] feeds it.

use std::collections::HashMap;
use std::time::Duration;

use cleave_metadata::{Directory, NodeId, OpKind, Phase, RangeDescriptor, RangeId, RangeState, ShardId};

/// Thresholds for automatic merges.
#[derive(Clone, Debug)]
pub struct MergePolicy {
    /// Bytes the two shards hold together, below which they merge (0: never).
    pub merge_size: u64,
    /// Requests per second the two serve together, below which they merge.
    pub merge_qps: f64,
    /// No merge of a range a split created or cut less than this ago.
    pub cooldown: Duration,
    pub max_merges: usize,
}

/// What the planner knows of one shard.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShardFigures {
    pub size_bytes: u64,
    pub qps: f64,
}

/// The left ranges of the pairs to merge now. `live`: the nodes heard
/// from recently (a merge copies to every replica of the left shard and
/// needs the right one's quorum: a pair with a replica on a node that is
/// down would stall, abort and be tried again, keeping both shards busy
/// and the healer out).
pub fn plan(
    dir: &Directory,
    figures: &HashMap<u64, ShardFigures>,
    policy: &MergePolicy,
    now_ms: u64,
    live: &[NodeId],
) -> Vec<RangeId> {
    if policy.merge_size == 0 {
        return Vec::new();
    }
    let running = dir.active_ops().filter(|op| matches!(op.kind, OpKind::Merge { .. })).count();
    let mut budget = policy.max_merges.saturating_sub(running);
    let mut wants = Vec::new();
    // Ranges already taken by a merge chosen here (a range merges once per round).
    let mut taken: Vec<RangeId> = Vec::new();
    let ranges: Vec<&RangeDescriptor> = dir.ranges.values().collect();
    for pair in ranges.windows(2) {
        if budget == 0 {
            break;
        }
        let (l, r) = (pair[0], pair[1]);
        if taken.contains(&l.range_id) || !mergeable(dir, l, r, policy, now_ms) {
            continue;
        }
        let all_live = |shard: ShardId| {
            dir.shards.get(&shard).is_some_and(|s| s.replicas.iter().all(|x| live.contains(&x.node_id)))
        };
        if !all_live(l.shard_id) || !all_live(r.shard_id) {
            continue;
        }
        let (Some(fl), Some(fr)) = (figures.get(&l.shard_id), figures.get(&r.shard_id)) else { continue };
        if fl.size_bytes + fr.size_bytes >= policy.merge_size || fl.qps + fr.qps >= policy.merge_qps {
            continue;
        }
        wants.push(l.range_id);
        taken.extend([l.range_id, r.range_id]);
        budget -= 1;
    }
    wants
}

/// Whether `l` and its right neighbour `r` may merge, figures aside.
fn mergeable(dir: &Directory, l: &RangeDescriptor, r: &RangeDescriptor, policy: &MergePolicy, now_ms: u64) -> bool {
    let alone = |x: &RangeDescriptor| dir.ranges.values().filter(|o| o.shard_id == x.shard_id).count() == 1;
    l.end.as_deref() == Some(r.start.as_str())
        && l.shard_id != r.shard_id
        && [l, r].iter().all(|x| x.state == RangeState::Active && alone(x))
        && [l, r].iter().all(|x| !recently_split(dir, x.range_id, policy.cooldown, now_ms))
        && !recently_failed(dir, l.range_id, policy.cooldown, now_ms)
        && dir.group_busy(l.shard_id).is_none()
        && dir.group_busy(r.shard_id).is_none()
        && dir.keyspaces.bound_at(&l.start, &r.start).is_none()
}

/// Whether a split that created or cut `range` finished within `cooldown`
/// (or runs now).
fn recently_split(dir: &Directory, range: RangeId, cooldown: Duration, now_ms: u64) -> bool {
    dir.ops.values().any(|op| {
        let OpKind::Split { range_id, new_range_id, .. } = &op.kind else { return false };
        (*range_id == range || *new_range_id == range)
            && op.entered(Phase::Done).is_none_or(|t| now_ms.saturating_sub(t) < cooldown.as_millis() as u64)
            && op.phase != Phase::Aborted
    })
}

/// Whether a merge of `left` with its neighbour was abandoned within
/// `cooldown`: tried again only after it (what failed may fail again).
fn recently_failed(dir: &Directory, left: RangeId, cooldown: Duration, now_ms: u64) -> bool {
    dir.ops.values().any(|op| {
        matches!(&op.kind, OpKind::Merge { left_range, .. } if *left_range == left)
            && op.entered(Phase::Aborted).is_some_and(|t| now_ms.saturating_sub(t) < cooldown.as_millis() as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleave_metadata::{MetaCommand, MetaResponse};

    fn policy() -> MergePolicy {
        MergePolicy { merge_size: 1000, merge_qps: 50.0, cooldown: Duration::from_secs(60), max_merges: 1 }
    }

    /// Three ranges `["", "g")`, `["g", "p")`, `["p", ∞)` on three shards,
    /// made by two splits that finished at 1 s.
    fn three() -> Directory {
        let mut d = Directory::bootstrap(&[(1, "a".into()), (2, "b".into()), (3, "c".into())], 3);
        for key in ["g", "p"] {
            let range_id = d.lookup(key).unwrap().range_id;
            let cmd = MetaCommand::PlanSplit {
                range_id,
                split_key: key.into(),
                target_nodes: vec![1, 2, 3],
                reason: "admin".into(),
                now_ms: 0,
            };
            let MetaResponse::Op(op) = d.apply(&cmd).unwrap() else { panic!() };
            for (from, to) in [
                (Phase::Planned, Phase::Created),
                (Phase::Created, Phase::Capturing),
                (Phase::Capturing, Phase::Frozen),
            ] {
                d.apply(&MetaCommand::AdvanceOp { op_id: op, from, to, now_ms: 0 }).unwrap();
            }
            d.apply(&MetaCommand::CommitSplit { op_id: op, now_ms: 0 }).unwrap();
            d.apply(&MetaCommand::FinishOp { op_id: op, write_pause_ms: None, now_ms: 1_000 }).unwrap();
        }
        d
    }

    fn figures(d: &Directory, size: u64, qps: f64) -> HashMap<u64, ShardFigures> {
        d.shards.keys().map(|s| (*s, ShardFigures { size_bytes: size, qps })).collect()
    }

    const LATER: u64 = 100_000;
    const LIVE: [NodeId; 3] = [1, 2, 3];

    #[test]
    fn merges_small_idle_neighbours_once_their_split_cooled_down() {
        let d = three();
        let first = d.lookup("a").unwrap().range_id;
        assert!(plan(&d, &figures(&d, 10, 1.0), &policy(), 30_000, &LIVE).is_empty(), "within the split's cooldown");
        assert_eq!(plan(&d, &figures(&d, 10, 1.0), &policy(), LATER, &LIVE), vec![first], "one slot: the first pair");
        let two = MergePolicy { max_merges: 2, ..policy() };
        assert_eq!(plan(&d, &figures(&d, 10, 1.0), &two, LATER, &LIVE).len(), 1, "a range merges once per round");
        assert!(plan(&d, &figures(&d, 500, 1.0), &policy(), LATER, &LIVE).is_empty(), "together too large");
        assert!(plan(&d, &figures(&d, 10, 30.0), &policy(), LATER, &LIVE).is_empty(), "together too busy");
        let off = MergePolicy { merge_size: 0, ..policy() };
        assert!(plan(&d, &figures(&d, 0, 0.0), &off, LATER, &LIVE).is_empty(), "--merge-size 0: never");
        assert!(plan(&d, &HashMap::new(), &policy(), LATER, &LIVE).is_empty(), "no figures, no merge");
    }

    #[test]
    fn a_pair_with_a_replica_on_a_node_that_is_down_or_a_merge_just_abandoned_waits() {
        let mut d = three();
        let first = d.lookup("a").unwrap().range_id;
        assert!(plan(&d, &figures(&d, 10, 1.0), &policy(), LATER, &[1, 2]).is_empty(), "node 3 is down");
        let MetaResponse::Op(op) =
            d.apply(&MetaCommand::PlanMerge { range_id: first, reason: "size".into(), now_ms: LATER }).unwrap()
        else {
            panic!()
        };
        let abort = MetaCommand::AbortOp { op_id: op, reason: "x".into(), now_ms: LATER, learner_only: false };
        d.apply(&abort).unwrap();
        d.apply(&MetaCommand::MarkCleaned { op_id: op }).unwrap();
        let wants = plan(&d, &figures(&d, 10, 1.0), &policy(), LATER + 1_000, &LIVE);
        assert!(!wants.contains(&first), "the pair just abandoned waits out the cooldown: {wants:?}");
        assert_eq!(plan(&d, &figures(&d, 10, 1.0), &policy(), LATER + 61_000, &LIVE), vec![first]);
    }

    #[test]
    fn a_running_merge_takes_the_slot_and_its_ranges() {
        let mut d = three();
        let first = d.lookup("a").unwrap().range_id;
        d.apply(&MetaCommand::PlanMerge { range_id: first, reason: "admin".into(), now_ms: LATER }).unwrap();
        assert!(plan(&d, &figures(&d, 10, 1.0), &policy(), LATER, &LIVE).is_empty(), "the one slot is taken");
        let two = MergePolicy { max_merges: 2, ..policy() };
        assert!(plan(&d, &figures(&d, 10, 1.0), &two, LATER, &LIVE).is_empty(), "the other pair shares a busy range");
    }

    #[test]
    fn keyspace_buckets_are_never_merged_into_each_other() {
        use cleave_metadata::keyspace::bucket_bounds;
        let mut d = three();
        let bounds = bucket_bounds("g", 2);
        d.keyspaces.0.insert("g".into(), cleave_metadata::keyspace::Keyspace { buckets: 2, active: true });
        for (l, r) in [("a", "g"), ("g", &bounds[0]), (&bounds[0], &bounds[1]), (&bounds[1], &bounds[2])] {
            assert_eq!(d.keyspaces.bound_at(l, r), Some("g"), "{l:?} | {r:?} is the keyspace's");
        }
        assert_eq!(d.keyspaces.bound_at(&bounds[2], "h"), None, "above the buckets: plain keys again");
        assert_eq!(d.keyspaces.bound_at("p", "q"), None);
        assert_eq!(d.keyspaces.bound_at("gx", "gy"), None, "within a bucket's keys");
    }
}
