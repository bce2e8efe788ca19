//! Replica garbage collection: a node deletes its replicas that the
//! directory no longer wants there.
//!
//! A move deletes the leaving replica itself, but not when the leaving node
//! is down (healing a dead node's shards is exactly that case), and an
//! aborted operation's new replica may sit on a node that was unreachable
//! at cleanup. Such a node, once back, learns from the metadata leader's
//! directory that it holds a replica nobody lists, and deletes it — the way
//! TiKV's replica GC does.
//!
//! Deleting a replica that is still a member would lose a voter's data, so
//! the rule is conservative: the replica must be missing from a directory
//! just confirmed by the metadata leader (right after a heartbeat answer),
//! continuously for [`GRACE`], and not created in this run from a newer
//! directory than the one at hand.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cleave_metadata::Directory;

use crate::node::Node;

/// How long a replica must stay unlisted before it is deleted.
pub const GRACE: Duration = Duration::from_secs(10);

/// Replicas seen unlisted, and since when.
#[derive(Default)]
pub struct Collector {
    unlisted_since: HashMap<u64, Instant>,
}

impl Collector {
    /// The local groups to delete now, given the fresh directory `dir`, the
    /// groups held here with the directory version that created each in
    /// this run (if any).
    pub fn due(&mut self, dir: &Directory, node: u64, held: &[(u64, Option<u64>)], now: Instant) -> Vec<u64> {
        let mut due = Vec::new();
        let mut still = HashMap::new();
        for (group, created_at) in held {
            let unwanted =
                dir.version > 0 && created_at.is_none_or(|v| dir.version >= v) && !dir.expects_replica(node, *group);
            if !unwanted {
                continue;
            }
            let since = *self.unlisted_since.get(group).unwrap_or(&now);
            if now.duration_since(since) >= GRACE {
                due.push(*group);
            } else {
                still.insert(*group, since);
            }
        }
        self.unlisted_since = still;
        due
    }
}

/// Deletes the replicas that are due (call right after a heartbeat answer).
pub async fn collect(node: &Node, collector: &mut Collector) {
    let dir = node.directory();
    let groups = node.groups();
    let held: Vec<(u64, Option<u64>)> = {
        let created = node.created_at.lock().unwrap();
        groups.iter().map(|g| (g.group, created.get(&g.group).copied())).collect()
    };
    for group in collector.due(&dir, node.id, &held, Instant::now()) {
        // The replica judged unlisted, by its id: a newer one created
        // meanwhile is not the one to delete.
        let Some(replica_id) = groups.iter().find(|g| g.group == group).map(|g| g.replica_id) else { continue };
        tracing::info!(group, replica_id, "deleting a replica the directory no longer lists");
        if let Err(e) = node.destroy_group(group, replica_id).await {
            tracing::warn!(group, "replica gc: {e}");
        }
        metrics::counter!("cleave_replicas_collected_total").increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> Directory {
        Directory::bootstrap(&[(1, "a".into()), (2, "b".into()), (3, "c".into())], 3)
    }

    #[test]
    fn only_unlisted_replicas_are_collected_after_the_grace_period() {
        let d = dir();
        let mut c = Collector::default();
        let t0 = Instant::now();
        // node 1 holds the metadata group and shard 1 (listed) and group 7 (not)
        let held = [(0, None), (1, None), (7, None)];
        assert!(c.due(&d, 1, &held, t0).is_empty(), "grace period first");
        assert_eq!(c.due(&d, 1, &held, t0 + GRACE), vec![7]);
    }

    #[test]
    fn a_replica_listed_again_restarts_the_grace_period() {
        let d = dir();
        let mut c = Collector::default();
        let t0 = Instant::now();
        assert!(c.due(&d, 1, &[(7, None)], t0).is_empty());
        assert!(c.due(&d, 1, &[], t0 + GRACE / 2).is_empty(), "gone meanwhile");
        assert!(c.due(&d, 1, &[(7, None)], t0 + GRACE).is_empty(), "seen unlisted anew");
    }

    #[test]
    fn replicas_created_from_a_newer_directory_are_kept() {
        let d = dir();
        let mut c = Collector::default();
        let t0 = Instant::now();
        let held = [(7, Some(d.version + 5))];
        assert!(c.due(&d, 1, &held, t0).is_empty());
        assert!(c.due(&d, 1, &held, t0 + GRACE * 2).is_empty());
        assert!(c.due(&Directory::default(), 1, &[(7, None)], t0 + GRACE * 3).is_empty(), "no directory yet");
    }
}
