//! The metadata leader's memory of the cluster: which nodes it heard from
//! and when (liveness), what each reported of its replicas, and who leads
//! each shard. In memory only — liveness changes every second and must not
//! be written through Raft — and started afresh whenever this node leads
//! group 0 in a new term or after a lapse in confirmed leadership.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cleave_metadata::api::Liveness;
use cleave_metadata::NodeId;

use crate::rpc::{GroupReport, NodeReport};

/// Silence after which a node is suspect, and after which it is down.
const SUSPECT_AFTER: Duration = Duration::from_secs(3);
const DOWN_AFTER: Duration = Duration::from_secs(10);

#[derive(Default)]
struct TrackerInner {
    /// node → when last heard, and its replicas' reports by group (a map:
    /// the balancers look a group up for every group, every second), as
    /// of its report number `seq` (reports come by difference: `delta`).
    seen: HashMap<NodeId, Seen>,
    /// group → (term, node) of the newest leader claim.
    leaders: HashMap<u64, (u64, NodeId)>,
    /// The number of `leaders`: a random epoch per tracker (high half),
    /// bumped with every change.
    leaders_version: u64,
    since: Option<Instant>,
    /// The term of group 0 in which this tracker records (this node leads).
    term: Option<u64>,
    /// When the newest read-index round confirming leadership in `term` started.
    confirmed_at: Option<Instant>,
}

/// What the tracker holds of one node.
struct Seen {
    at: Instant,
    seq: u64,
    groups: BTreeMap<u64, GroupReport>,
}

impl TrackerInner {
    fn fresh(term: Option<u64>) -> TrackerInner {
        TrackerInner {
            term,
            since: Some(Instant::now()),
            leaders_version: u64::from(rand::random::<u32>()) << 32,
            ..Default::default()
        }
    }

    /// Sets the leader of `group` (or forgets it), counting a change.
    fn set_leader(&mut self, group: u64, leader: Option<(u64, NodeId)>) {
        let changed = match leader {
            Some(l) => self.leaders.insert(group, l).is_none_or(|old| old.1 != l.1),
            None => self.leaders.remove(&group).is_some(),
        };
        if changed {
            self.leaders_version = self.leaders_version.wrapping_add(1);
        }
    }
}

/// Heartbeat bookkeeping of the metadata leader.
#[derive(Default)]
pub struct Tracker {
    inner: Mutex<TrackerInner>,
}

impl Tracker {
    /// Whether leadership in `term` was confirmed less than `valid` ago.
    pub(super) fn confirmed(&self, term: u64, valid: Duration) -> bool {
        let t = self.inner.lock().unwrap();
        t.term == Some(term) && t.confirmed_at.is_some_and(|at| at.elapsed() < valid)
    }

    /// Forgets the cached confirmation (leadership is being handed away).
    pub fn unconfirm(&self) {
        self.inner.lock().unwrap().confirmed_at = None;
    }

    /// Records a confirmation of leadership in `term` by a round that
    /// started at `started`. A new term starts the tracker afresh: nothing
    /// heard in an earlier term (before leadership was lost) counts. A
    /// confirmation after a lapse longer than `lapse` (leadership could not
    /// be confirmed for that long — the quorum was out of reach, even if
    /// the term did not change) starts afresh too: heartbeats were not
    /// recorded meanwhile, so their ages say nothing about the nodes.
    pub(super) fn confirm(&self, term: u64, started: Instant, lapse: Duration) {
        let mut t = self.inner.lock().unwrap();
        let lapsed = t.confirmed_at.is_some_and(|at| started.saturating_duration_since(at) > lapse);
        if t.term != Some(term) || lapsed {
            tracing::info!(term, lapsed, "leading the metadata group anew: liveness starts afresh");
            *t = TrackerInner::fresh(Some(term));
        }
        if t.confirmed_at.is_none_or(|at| at < started) {
            t.confirmed_at = Some(started);
        }
    }

    /// Records a heartbeat: the node is alive, and its replicas' figures
    /// are those of the report (whole, or applied to the one recorded
    /// before). Answers `false` when the report builds on a report not
    /// recorded here: the node must send a whole one.
    pub(super) fn record(&self, hb: &NodeReport) -> bool {
        let mut t = self.inner.lock().unwrap();
        t.since.get_or_insert_with(Instant::now);
        // Taken out and put back: the groups are brought up to date in place.
        let mut recorded = t.seen.remove(&hb.node_id).map(|s| (s.seq, s.groups));
        if !super::delta::apply(&mut recorded, hb) {
            // Alive all the same, its figures as they were.
            if let Some((seq, groups)) = recorded {
                t.seen.insert(hb.node_id, Seen { at: Instant::now(), seq, groups });
            }
            return false;
        }
        let (seq, groups) = recorded.expect("applied");
        for g in &hb.groups {
            if g.is_leader {
                let newer = t.leaders.get(&g.group).is_none_or(|(term, _)| g.term >= *term);
                if newer {
                    t.set_leader(g.group, Some((g.term, hb.node_id)));
                }
            } else if t.leaders.get(&g.group).is_some_and(|(_, n)| *n == hb.node_id) {
                t.set_leader(g.group, None);
            }
        }
        for id in &hb.gone {
            if t.leaders.get(id).is_some_and(|(_, n)| *n == hb.node_id) {
                t.set_leader(*id, None);
            }
        }
        t.seen.insert(hb.node_id, Seen { at: Instant::now(), seq, groups });
        true
    }

    /// The shard-leader map and its number.
    pub fn leaders_versioned(&self) -> (u64, Vec<(u64, NodeId)>) {
        let version = self.inner.lock().unwrap().leaders_version;
        (version, self.leaders())
    }

    /// The number of the shard-leader map.
    pub fn leaders_version(&self) -> u64 {
        self.inner.lock().unwrap().leaders_version
    }

    pub fn leaders(&self) -> Vec<(u64, NodeId)> {
        let t = self.inner.lock().unwrap();
        let mut v: Vec<_> = t.leaders.iter().map(|(g, (_, n))| (*g, *n)).collect();
        v.sort();
        v
    }

    pub(super) fn liveness(&self, node: NodeId) -> (Liveness, Option<u64>) {
        let t = self.inner.lock().unwrap();
        match t.seen.get(&node) {
            Some(Seen { at, .. }) => {
                let age = at.elapsed();
                let l = if age < SUSPECT_AFTER {
                    Liveness::Up
                } else if age < DOWN_AFTER {
                    Liveness::Suspect
                } else {
                    Liveness::Down
                };
                (l, Some(age.as_millis() as u64))
            }
            None if t.since.is_some_and(|s| s.elapsed() > DOWN_AFTER) => (Liveness::Down, None),
            None => (Liveness::Unknown, None),
        }
    }

    /// Whether this tracker has been running long enough to have heard
    /// from every live node.
    pub fn settled(&self) -> bool {
        self.inner.lock().unwrap().since.is_some_and(|s| s.elapsed() > SUSPECT_AFTER)
    }

    /// How long `node` has been silent: since its last heartbeat, or since
    /// this tracker started if it never reported. Zero while up.
    pub fn silent_for(&self, node: NodeId) -> Duration {
        let t = self.inner.lock().unwrap();
        match t.seen.get(&node) {
            Some(s) => s.at.elapsed(),
            None => t.since.map_or(Duration::ZERO, |s| s.elapsed()),
        }
    }

    /// Whether `node` reported recently.
    pub fn is_up(&self, node: NodeId) -> bool {
        self.liveness(node).0 == Liveness::Up
    }

    /// Nodes heard from recently.
    pub fn live_nodes(&self) -> Vec<NodeId> {
        let t = self.inner.lock().unwrap();
        t.seen.iter().filter(|(_, s)| s.at.elapsed() < SUSPECT_AFTER).map(|(n, _)| *n).collect()
    }

    /// The latest report of `group` from its leader, if known.
    pub fn leader_report(&self, group: u64) -> Option<GroupReport> {
        let leader = self.inner.lock().unwrap().leaders.get(&group).map(|(_, n)| *n)?;
        self.report(leader, group)
    }

    pub fn report(&self, node: NodeId, group: u64) -> Option<GroupReport> {
        let t = self.inner.lock().unwrap();
        t.seen.get(&node).and_then(|s| s.groups.get(&group).cloned())
    }

    /// The replicas `node` said it holds, `(group, replica)`, in its newest
    /// heartbeat of this term, if it reported at all.
    pub fn held(&self, node: NodeId) -> Option<Vec<(u64, u64)>> {
        let t = self.inner.lock().unwrap();
        t.seen.get(&node).map(|s| s.groups.values().map(|g| (g.group, g.replica_id)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(node: NodeId) -> NodeReport {
        NodeReport {
            node_id: node,
            raft_addr: String::new(),
            api_addr: String::new(),
            directory_version: 0,
            groups: vec![],
            seq: 0,
            base: None,
            gone: vec![],
            leaders_version: 0,
        }
    }

    #[test]
    fn liveness_starts_afresh_after_a_new_term_or_a_lapse_in_confirmation() {
        let t = Tracker::default();
        let valid = Duration::from_millis(500);
        let t0 = Instant::now();
        t.confirm(1, t0, valid * 4);
        t.record(&beat(2));
        assert!(t.live_nodes().contains(&2));
        // Confirmed again soon after, in the same term: history kept.
        t.confirm(1, t0 + valid, valid * 4);
        assert!(t.live_nodes().contains(&2));
        // Confirmed again only after a long lapse (the quorum was out of
        // reach), same term: what was heard before says nothing now.
        t.confirm(1, t0 + valid * 10, valid * 4);
        assert!(t.live_nodes().is_empty(), "a lapse must reset liveness");
        t.record(&beat(3));
        // A new term: afresh as well.
        t.confirm(2, t0 + valid * 11, valid * 4);
        assert!(t.live_nodes().is_empty(), "a new term must reset liveness");
    }
}
