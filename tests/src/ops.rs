//! Helpers for tests of long-running operations (splits, moves): start and
//! follow them, and read the cluster's ranges, shards and per-node figures.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cleave_metadata::range::check_tiling;
use serde_json::Value;

use crate::{
    secs, wait_for, Cluster, NodeId, OpKind, OperationView, Phase, RangeDescriptor, RangeState, ShardId, ShardStatus,
};

// ---------------------------------------------------------------------------
// Split admin helpers
// ---------------------------------------------------------------------------

/// Whose leader a kill test kills while a split or merge is held in a phase.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Victim {
    /// The shard that gives the range up (a split's source, a merge's right shard).
    Source,
    /// The shard that takes it (a split's new shard, before it exists a node
    /// meant to host a replica; a merge's left shard).
    Target,
    /// The metadata group, which drives the operation.
    Meta,
}

/// The phases a split or merge can be held in before it is done.
pub const PHASES: [Phase; 5] = [Phase::Planned, Phase::Created, Phase::Capturing, Phase::Frozen, Phase::Committed];

/// Posts `body` to admin endpoint `path` through node `via`, retrying
/// transient answers, and returns the first definite answer.
pub async fn admin_post(c: &Cluster, via: NodeId, path: &str, body: &Value) -> crate::Resp {
    let url = crate::Http::url(&c.api(via), path);
    wait_for(secs(20), format_args!("POST {path} {body} through node {via} to answer"), || async {
        let r = c.http.send(reqwest::Method::POST, url.clone(), Some(body.to_string())).await.ok()?;
        (!r.is_transient()).then_some(r)
    })
    .await
}

/// Starts an operation (`/admin/split`, `/admin/move`) through node `via`;
/// returns its id.
pub async fn start_op(c: &Cluster, via: NodeId, path: &str, body: Value) -> u64 {
    let r = admin_post(c, via, path, &body).await;
    assert_eq!(r.status, 200, "POST {path} {body}: {r:?}");
    r.value()["operation_id"].as_u64().unwrap_or_else(|| panic!("no operation_id in {r:?}"))
}

/// Starts a split through node `via`; returns the operation id.
pub async fn start_split(c: &Cluster, via: NodeId, body: Value) -> u64 {
    start_op(c, via, "/admin/split", body).await
}

/// The operation as some running node reports it.
pub async fn try_op(c: &Cluster, id: u64) -> Option<OperationView> {
    for node in c.up_ids() {
        if let Ok(v) = c.http.admin_operation(&c.api(node), id).await {
            return Some(v);
        }
    }
    None
}

/// `(range, split key, source shard, target shard, new range)` of a split.
pub fn split_kind(v: &OperationView) -> (u64, &str, ShardId, ShardId, u64) {
    let OpKind::Split { range_id, split_key, source, target, new_range_id, .. } = &v.op.kind else {
        panic!("operation {} is not a split: {:?}", v.op.op_id, v.op.kind)
    };
    (*range_id, split_key.as_str(), *source, *target, *new_range_id)
}

pub fn describe(v: &OperationView) -> String {
    let what = match &v.op.kind {
        OpKind::Split { .. } => {
            let (range, key, source, target, new_range) = split_kind(v);
            format!("split range {range} at {key:?}, shard {source} → {target} as range {new_range}")
        }
        OpKind::Merge { left_range, right_range, left, right, reason, .. } => {
            format!("merge of range {right_range} (shard {right}) into range {left_range} (shard {left}), {reason}")
        }
        OpKind::Move { shard_id, from, to, reason } => format!(
            "move of shard {shard_id} from node {} (replica {}) to node {} (replica {}), {reason}",
            from.node_id, from.replica_id, to.node_id, to.replica_id
        ),
    };
    format!(
        "op {} ({what}): phase {:?}, durations {:?}, pause {:?} ms, progress {:?}, error {:?}, cleaned {}",
        v.op.op_id, v.op.phase, v.phase_durations_ms, v.op.write_pause_ms, v.op.progress, v.op.error, v.op.cleaned
    )
}

/// Waits until operation `id` is in `phase`; panics if it ends in another.
pub async fn wait_phase(c: &Cluster, id: u64, phase: Phase, timeout: Duration) -> OperationView {
    let mut last = None;
    let start = Instant::now();
    loop {
        if let Some(v) = try_op(c, id).await {
            if v.op.phase == phase {
                return v;
            }
            assert!(
                !v.op.phase.is_terminal() && v.op.phase < phase,
                "operation {id} went past {phase:?} before the test saw it: {}",
                describe(&v)
            );
            last = Some(v);
        }
        assert!(
            start.elapsed() < timeout,
            "operation {id} did not reach {phase:?} within {timeout:?}; last seen: {:?}",
            last.as_ref().map(describe)
        );
        c.assert_running();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until operation `id` is done, or aborted and cleaned up.
pub async fn wait_ended(c: &Cluster, id: u64, timeout: Duration) -> OperationView {
    let mut last: Option<OperationView> = None;
    let start = Instant::now();
    loop {
        if let Some(v) = try_op(c, id).await {
            if v.op.phase == Phase::Done || (v.op.phase == Phase::Aborted && v.op.cleaned) {
                return v;
            }
            last = Some(v);
        }
        if start.elapsed() > timeout {
            panic!(
                "operation {id} did not end (done, or aborted and cleaned) within {timeout:?}; last seen: {}",
                last.as_ref().map_or("nothing".into(), describe)
            );
        }
        c.assert_running();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until operation `id` is done; panics if it aborts.
pub async fn wait_done(c: &Cluster, id: u64, timeout: Duration) -> OperationView {
    let v = wait_ended(c, id, timeout).await;
    assert_eq!(v.op.phase, Phase::Done, "operation aborted: {}", describe(&v));
    v
}

/// `/admin/ranges` from some running node, sorted by start, checked to tile
/// the key space.
pub async fn ranges(c: &Cluster) -> Vec<RangeDescriptor> {
    let mut rs = wait_for(secs(15), "/admin/ranges to answer", || async {
        for node in c.up_ids() {
            if let Ok(rs) = c.http.admin_ranges(&c.api(node)).await {
                return Some(rs);
            }
        }
        None
    })
    .await;
    rs.sort_by(|a, b| a.start.cmp(&b.start));
    if let Err(e) = check_tiling(&rs) {
        panic!("ranges do not tile the key space: {e}\n{rs:#?}");
    }
    rs
}

pub fn range_of<'a>(rs: &'a [RangeDescriptor], key: &str) -> &'a RangeDescriptor {
    rs.iter().find(|r| r.contains(key)).unwrap_or_else(|| panic!("no range holds {key:?}: {rs:?}"))
}

/// Asserts the directory shows the outcome of split `v` of `before` (the
/// range as it was just before the split).
pub async fn assert_split_outcome(c: &Cluster, v: &OperationView, before: &RangeDescriptor) {
    let (range_id, key, source, target, new_range_id) = split_kind(v);
    assert_eq!((range_id, source), (before.range_id, before.shard_id), "split of another range: {}", describe(v));
    let rs = ranges(c).await;
    let shards = shards(c).await;
    match v.op.phase {
        Phase::Done => {
            let left = rs.iter().find(|r| r.range_id == range_id).expect("left range");
            let right = rs.iter().find(|r| r.range_id == new_range_id).expect("right range");
            let want_left = RangeDescriptor {
                end: Some(key.to_owned()),
                epoch: before.epoch + 1,
                state: RangeState::Active,
                ..before.clone()
            };
            let want_right = RangeDescriptor {
                range_id: new_range_id,
                start: key.to_owned(),
                end: before.end.clone(),
                shard_id: target,
                epoch: before.epoch + 1,
                state: RangeState::Active,
            };
            assert_eq!((left, right), (&want_left, &want_right), "ranges after {}", describe(v));
            assert_ne!(target, source);
            let OpKind::Split { target_replicas, .. } = &v.op.kind else { unreachable!("split_kind checked") };
            let s = shards.iter().find(|s| s.shard_id == target).expect("new shard listed in /admin/shards");
            let mut got = s.replicas.clone();
            got.sort();
            let mut want = target_replicas.clone();
            want.sort();
            assert_eq!(got, want, "replicas of the new shard {target}");
            assert_pause(v);
        }
        Phase::Aborted => {
            assert!(v.op.cleaned, "{}", describe(v));
            let now = rs.iter().find(|r| r.range_id == range_id).expect("range still there");
            assert_eq!(now, before, "an aborted split changed its range: {}", describe(v));
            assert!(rs.iter().all(|r| r.range_id != new_range_id), "aborted split left range {new_range_id}: {rs:?}");
            assert!(
                shards.iter().all(|s| s.shard_id != target),
                "aborted split left shard {target} in /admin/shards: {shards:?}"
            );
        }
        p => panic!("operation not ended: {p:?}"),
    }
}

/// Checks the write pause a split or merge reported: frozen to commit is
/// bounded by the 5 s freeze deadline (the driver checks it just before it
/// commits); the pause runs on to the cutover, past any hold of `committed`.
fn assert_pause(v: &OperationView) {
    let pause = v.op.write_pause_ms.unwrap_or_else(|| panic!("no write_pause_ms reported: {}", describe(v)));
    let frozen = v.phase_durations_ms.iter().find(|(p, _)| *p == Phase::Frozen).map_or(0, |(_, ms)| *ms);
    assert!(frozen <= 5_500, "committed after {frozen} ms frozen, past the freeze deadline: {}", describe(v));
    assert!(pause >= frozen, "write pause {pause} ms shorter than the freeze: {}", describe(v));
}

/// Starts a merge of range `range_id` with its right neighbour through node
/// `via`; returns the operation id.
pub async fn start_merge(c: &Cluster, via: NodeId, range_id: u64) -> u64 {
    start_op(c, via, "/admin/merge", serde_json::json!({ "range_id": range_id })).await
}

/// Asserts the directory shows the outcome of merge `v` of `left` and
/// `right` (the two ranges as they were just before it): done, one range
/// of the left shard covering both at an epoch above both, the right shard
/// gone; aborted, both ranges as they were.
pub async fn assert_merge_outcome(c: &Cluster, v: &OperationView, left: &RangeDescriptor, right: &RangeDescriptor) {
    let OpKind::Merge { left_range, right_range, left: ls, right: rs_id, .. } = &v.op.kind else {
        panic!("not a merge: {}", describe(v))
    };
    assert_eq!(
        (*left_range, *right_range, *ls, *rs_id),
        (left.range_id, right.range_id, left.shard_id, right.shard_id)
    );
    let rs = ranges(c).await;
    let shards = shards(c).await;
    match v.op.phase {
        Phase::Done => {
            let merged = rs.iter().find(|r| r.range_id == left.range_id).expect("merged range");
            let want = RangeDescriptor {
                end: right.end.clone(),
                epoch: left.epoch.max(right.epoch) + 1,
                state: RangeState::Active,
                ..left.clone()
            };
            assert_eq!(merged, &want, "range after {}", describe(v));
            assert!(rs.iter().all(|r| r.range_id != right.range_id), "merged range {} still listed", right.range_id);
            assert!(shards.iter().all(|s| s.shard_id != right.shard_id), "shard {} still listed", right.shard_id);
            assert_pause(v);
        }
        Phase::Aborted => {
            assert!(v.op.cleaned, "{}", describe(v));
            for before in [left, right] {
                let now = rs.iter().find(|r| r.range_id == before.range_id).expect("range still there");
                assert_eq!(now, before, "an aborted merge changed a range: {}", describe(v));
            }
            assert!(shards.iter().any(|s| s.shard_id == right.shard_id), "an aborted merge removed the right shard");
        }
        p => panic!("operation not ended: {p:?}"),
    }
}

/// `/admin/shards` from some running node.
pub async fn shards(c: &Cluster) -> Vec<ShardStatus> {
    wait_for(secs(15), "/admin/shards to answer", || async {
        for node in c.up_ids() {
            if let Ok(s) = c.http.admin_shards(&c.api(node)).await {
                return Some(s);
            }
        }
        None
    })
    .await
}

/// Per node, the number of Raft groups it hosts (`cleave_groups`).
pub async fn groups_per_node(c: &Cluster) -> BTreeMap<NodeId, u64> {
    let mut out = BTreeMap::new();
    for id in c.up_ids() {
        out.insert(id, c.metric(id, "cleave_groups").await as u64);
    }
    out
}

/// Sum of a counter over every running node.
pub async fn metric_sum(c: &Cluster, name: &str) -> f64 {
    let mut sum = 0.0;
    for id in c.up_ids() {
        sum += c.metric(id, name).await;
    }
    sum
}

/// Waits until every shard in the directory has a running leader.
pub async fn wait_all_shards_led(c: &Cluster, timeout: Duration) {
    for s in shards(c).await.iter().map(|s| s.shard_id) {
        c.wait_for_group_leader(s, None, timeout).await;
    }
}
