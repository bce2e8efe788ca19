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
//! continuously for [`GRACE`]; that directory must be at least as new as
//! the newest this node has ever seen ([`crate::node::DirectoryCache::floor`], persisted
//! in `cluster.json`, raised by every replica-creating request before the
//! replica is created, so it survives kill -9 and restart); and the check
//! is made again under the lifecycle lock right before the destroy, so a
//! `CreateGroup` that landed meanwhile is never destroyed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cleave_metadata::{Directory, NodeId};

use crate::node::{unwanted, Node};

/// How long a replica must stay unlisted before it is deleted.
pub const GRACE: Duration = Duration::from_secs(10);

/// Replicas seen unlisted, and since when.
#[derive(Default)]
pub struct Collector {
    unlisted_since: HashMap<u64, Instant>,
}

impl Collector {
    /// The local groups to delete now, given the fresh directory `dir`, the
    /// directory floor and the groups held here.
    pub fn due(&mut self, dir: &Directory, floor: u64, node: NodeId, held: &[u64], now: Instant) -> Vec<u64> {
        let mut due = Vec::new();
        let mut still = HashMap::new();
        for group in held {
            if !unwanted(dir, floor, node, *group) {
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
    let groups = node.groups().in_service();
    let held: Vec<u64> = groups.iter().map(|g| g.group).collect();
    for group in collector.due(&dir, node.dir_cache().floor(), node.id(), &held, Instant::now()) {
        // The replica judged unlisted, by its id: a newer one created
        // meanwhile is not the one to delete.
        let Some(replica_id) = groups.iter().find(|g| g.group == group).map(|g| g.replica_id) else { continue };
        match node.collect_replica(group, replica_id).await {
            Ok(true) => metrics::counter!("cleave_replicas_collected_total").increment(1),
            Ok(false) => {}
            Err(e) => tracing::warn!(group, "replica gc: {e}"),
        }
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
        let held = [0, 1, 7];
        assert!(c.due(&d, 0, 1, &held, t0).is_empty(), "grace period first");
        assert_eq!(c.due(&d, 0, 1, &held, t0 + GRACE), vec![7]);
    }

    #[test]
    fn a_replica_listed_again_restarts_the_grace_period() {
        let d = dir();
        let mut c = Collector::default();
        let t0 = Instant::now();
        assert!(c.due(&d, 0, 1, &[7], t0).is_empty());
        assert!(c.due(&d, 0, 1, &[], t0 + GRACE / 2).is_empty(), "gone meanwhile");
        assert!(c.due(&d, 0, 1, &[7], t0 + GRACE).is_empty(), "seen unlisted anew");
    }

    #[test]
    fn no_directory_older_than_the_newest_seen_is_trusted() {
        let d = dir();
        let mut c = Collector::default();
        let t0 = Instant::now();
        // A replica was created from directory version d.version + 5 (or a
        // directory that new was installed before a restart): the older
        // directory at hand, say from a metadata leader cut off from its
        // quorum, does not list it and must not have it deleted.
        let floor = d.version + 5;
        assert!(c.due(&d, floor, 1, &[7], t0).is_empty());
        assert!(c.due(&d, floor, 1, &[7], t0 + GRACE * 2).is_empty());
        assert!(c.due(&Directory::default(), 0, 1, &[7], t0 + GRACE * 3).is_empty(), "no directory yet");
        assert!(c.due(&d, d.version, 1, &[7], t0 + GRACE * 4).is_empty(), "grace starts once trusted");
        assert_eq!(c.due(&d, d.version, 1, &[7], t0 + GRACE * 5), vec![7]);
    }

    #[test]
    fn the_check_made_again_before_the_destroy_sees_a_create_that_landed_meanwhile() {
        let d = dir();
        let mut c = Collector::default();
        let t0 = Instant::now();
        c.due(&d, 0, 1, &[7], t0);
        assert_eq!(c.due(&d, 0, 1, &[7], t0 + GRACE), vec![7], "judged unwanted");
        // Then a CreateGroup for group 7 lands, from a directory two
        // versions on: it raised the floor. The check under the lifecycle
        // lock refuses the destroy.
        let floor = d.version + 2;
        assert!(!unwanted(&d, floor, 1, 7));
    }
}
