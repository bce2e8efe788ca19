//! The source leader's side of a mirrored split (`split::mirror`): nothing
//! to ship, only to tell the driver how far the target's nodes have got.
//!
//! For as long as this node leads the source and the capture runs, it asks
//! every node of a target replica for its copy ([`rpc::MirrorStatus`],
//! which also starts a copy that has not begun) and folds the answers into
//! the [`ForwardStatus`] the driver's planner already reads:
//! - the backfill is done when every node's copy is;
//! - nothing is ever waiting to be shipped (the mirror is part of the
//!   source's own apply), so the driver freezes as soon as the copies are
//!   done;
//! - once frozen, the digest is given when every node's source replica has
//!   applied the freeze and all their copies hold the same content; copies
//!   that differ are reported as a mismatch, and the split is abandoned.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cleave_metadata::OpKind;

use super::forwarder::{current_capture, end_orphan, range_size_estimate};
use super::mirror::{MirrorReport, MirrorSpec};
use crate::kv::Capture;
use crate::node::Node;
use crate::rpc::{self, ExecError, ForwardStatus};

/// How far (in log entries) a node's source replica may be behind the
/// newest when the copies are reported done.
const FREEZE_LAG: u64 = 64;

/// How often the target's nodes are asked while the copies run, and while
/// writes are frozen (the driver waits on the answer then).
const POLL: Duration = Duration::from_millis(50);
const POLL_FROZEN: Duration = Duration::from_millis(1);

/// Reports on a mirrored capture until it ends or this node stops leading.
pub async fn run(node: &Arc<Node>, group: u64, cap: &Capture, status: &Mutex<ForwardStatus>) -> Result<(), ExecError> {
    if end_orphan(node, group, cap).await? {
        return Ok(());
    }
    let nodes: Vec<u64> = match node.directory().ops.get(&cap.op_id).map(|o| &o.kind) {
        Some(OpKind::Split { target_replicas, .. }) => target_replicas.iter().map(|r| r.node_id).collect(),
        _ => return Err(ExecError::Unavailable(format!("operation {} is not in the directory here", cap.op_id))),
    };
    let spec = MirrorSpec::of_capture(group, cap);
    let estimate = range_size_estimate(&node.ctx().db, group, cap);
    loop {
        let Some(now) = current_capture(node, group, cap.op_id) else { return Ok(()) };
        let router = node.router();
        let calls = nodes.iter().map(|n| router.node_call(*n, rpc::MirrorStatus { spec: Box::new(spec.clone()) }));
        let reports: Vec<Option<MirrorReport>> =
            futures::future::join_all(calls).await.into_iter().map(|r| r.ok().flatten()).collect();
        let mut st = fold(&reports, now.frozen_at, estimate);
        if reports.iter().any(Option::is_none) {
            // A node that did not answer this time: not a new attempt.
            st.attempt = status.lock().unwrap().attempt.max(1);
        }
        if st.backfill_done {
            // What the shipped path reports while it forwards: here the
            // writes reach the target as they are applied, so none wait.
            metrics::gauge!("cleave_split_forward_backlog", "shard" => group.to_string()).set(0.0);
        }
        *status.lock().unwrap() = st;
        tokio::time::sleep(if now.frozen_at.is_some() { POLL_FROZEN } else { POLL }).await;
    }
}

/// The status the driver sees, from the nodes' reports (`None`: a node that
/// did not answer, or holds no copy) and the source's freeze index.
fn fold(reports: &[Option<MirrorReport>], frozen_at: Option<u64>, estimate: u64) -> ForwardStatus {
    let answered: Vec<&MirrorReport> = reports.iter().flatten().collect();
    let all = answered.len() == reports.len() && !reports.is_empty();
    // The freeze waits for every node's source replica to be close to the
    // newest: the cutover needs each to apply the freeze in time.
    let newest = answered.iter().map(|r| r.applied).max().unwrap_or(0);
    let close = answered.iter().all(|r| r.applied + FREEZE_LAG >= newest);
    let done = all && close && answered.iter().all(|r| r.done);
    // Progress is the slowest copy's.
    let slowest = answered.iter().min_by_key(|r| r.figures.copied).map(|r| r.figures);
    let copied = if all { slowest.map_or(0, |f| f.copied) } else { 0 };
    let mut st = ForwardStatus {
        // A copy that starts over (a node restarted) counts from zero.
        attempt: answered.iter().fold(0, |a, r| a ^ r.attempt).max(1),
        backfill_done: done,
        keys_copied: if all { slowest.map_or(0, |f| f.keys) } else { 0 },
        bytes_copied: copied,
        keys_total: 0,
        bytes_total: estimate.max(copied),
        last_seq: frozen_at.unwrap_or(0),
        shipped: frozen_at.unwrap_or(0),
        drained: true,
        digest: None,
        frozen_at,
        frozen_ts: 0,
        mismatch: None,
    };
    st.keys_total = st.keys_copied;
    if done {
        // The copies are the whole range: the estimate has served.
        st.bytes_total = copied;
    }
    let Some(f) = frozen_at else { return st };
    let settled = done && answered.iter().all(|r| r.frozen_at.is_some_and(|x| x >= f));
    if settled {
        let first = answered[0].figures.digest;
        match answered.iter().find(|r| r.figures.digest != first) {
            None => st.digest = Some(first),
            Some(r) => {
                st.mismatch = Some(format!("the target's copies differ: digests {first:x} and {:x}", r.figures.digest))
            }
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::mirror::Figures;

    fn report(done: bool, copied: u64, digest: u64, frozen_at: Option<u64>) -> Option<MirrorReport> {
        let figures = Figures { keys: copied / 10, bytes: copied, digest, copied };
        Some(MirrorReport { done, figures, frozen_at, attempt: 7, applied: 1000 })
    }

    #[test]
    fn the_copies_are_not_done_while_a_source_replica_lags_and_a_new_copy_is_a_new_attempt() {
        let lagging = MirrorReport { applied: 1000 - FREEZE_LAG - 1, ..report(true, 100, 7, None).unwrap() };
        let st = fold(&[report(true, 100, 7, None), Some(lagging.clone())], None, 0);
        assert!(!st.backfill_done, "a replica too far behind to apply the freeze in time");
        let caught_up = MirrorReport { applied: 1000 - FREEZE_LAG, ..lagging };
        let st = fold(&[report(true, 100, 7, None), Some(caught_up.clone())], None, 0);
        assert!(st.backfill_done);
        let again = MirrorReport { attempt: 9, ..caught_up };
        assert_ne!(fold(&[report(true, 100, 7, None), Some(again)], None, 0).attempt, st.attempt);
    }

    #[test]
    fn the_backfill_is_done_only_when_every_node_has_its_copy() {
        let st = fold(&[report(true, 100, 7, None), report(false, 40, 3, None)], None, 90);
        assert!(!st.backfill_done);
        assert_eq!(st.bytes_copied, 40, "progress is the slowest copy's");
        assert_eq!(st.bytes_total, 90);
        let st = fold(&[report(true, 100, 7, None), None], None, 90);
        assert!(!st.backfill_done, "a node that did not answer is not done");
        let st = fold(&[report(true, 100, 7, None), report(true, 100, 7, None)], None, 90);
        assert!(st.backfill_done);
        assert_eq!(st.last_seq, st.shipped, "nothing waits to be shipped: freeze at once");
        assert_eq!(st.digest, None, "no digest before the freeze");
    }

    #[test]
    fn the_digest_comes_once_every_node_applied_the_freeze_and_copies_agree() {
        let behind = fold(&[report(true, 100, 7, Some(50)), report(true, 100, 7, None)], Some(50), 0);
        assert_eq!(behind.digest, None, "a node whose source replica has not frozen yet");
        assert_eq!(behind.last_seq, 50);
        let ok = fold(&[report(true, 100, 7, Some(50)), report(true, 100, 7, Some(u64::MAX))], Some(50), 0);
        assert_eq!(ok.digest, Some(7));
        assert_eq!(ok.mismatch, None);
        let bad = fold(&[report(true, 100, 7, Some(50)), report(true, 100, 8, Some(50))], Some(50), 0);
        assert_eq!(bad.digest, None);
        assert!(bad.mismatch.is_some());
    }
}
