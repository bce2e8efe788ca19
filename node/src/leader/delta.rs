//! Heartbeats by difference: a node tells the metadata leader only what
//! changed in its replicas' figures since the report the leader last
//! acknowledged, not every replica every second.
//!
//! With thousands of quiet shards per node, a whole report is thousands of
//! [`GroupReport`]s a second from every node, each decoded and filed by the
//! leader — the leader's largest idle cost. A quiet replica's figures do
//! not change (same leader, term, applied index, size, no requests), so a
//! report by difference is nearly empty when the cluster is idle.
//!
//! The protocol: every report carries a sequence number `seq`; a report by
//! difference also carries `base`, the `seq` of the report it builds on,
//! and the groups no longer held (`gone`). The leader's tracker applies a
//! difference only to the report it recorded last from that node with that
//! very `seq`; otherwise (a new leader, a report lost, an answer lost) it
//! answers `need_full`, and the node sends everything next time. A whole
//! report also goes out every [`FULL_EVERY`] beats, which bounds how long
//! any drift could last.
//!
//! The shard leaders in the answer go the same way: the tracker numbers its
//! leader map (a random epoch per tracker, a counter per change) and sends
//! the map only to a node whose copy has another number.

use std::collections::BTreeMap;

use crate::rpc::{GroupReport, NodeReport};

/// A whole report at least this often (beats).
pub const FULL_EVERY: u32 = 60;

/// What a node remembers of its reports: see the module.
#[derive(Debug, Default)]
pub struct Reporter {
    next_seq: u64,
    /// The report the leader acknowledged last: its `seq` and groups.
    acked: Option<(u64, BTreeMap<u64, GroupReport>)>,
    /// Beats since the last whole report.
    since_full: u32,
    /// The number of the leader map this node holds.
    pub leaders_version: u64,
}

/// A report on its way: what the node will remember if it is acknowledged.
#[derive(Debug)]
pub struct Pending {
    seq: u64,
    groups: BTreeMap<u64, GroupReport>,
}

impl Reporter {
    /// Turns a whole report into the one to send: by difference against the
    /// last acknowledged report, or whole when there is none to build on or
    /// one is due.
    pub fn prepare(&mut self, mut report: NodeReport) -> (NodeReport, Pending) {
        self.next_seq += 1;
        let seq = self.next_seq;
        let groups: BTreeMap<u64, GroupReport> = report.groups.drain(..).map(|g| (g.group, g)).collect();
        report.seq = seq;
        report.leaders_version = self.leaders_version;
        match &self.acked {
            Some((base, acked)) if self.since_full < FULL_EVERY => {
                self.since_full += 1;
                report.base = Some(*base);
                report.groups = groups.values().filter(|g| acked.get(&g.group) != Some(*g)).cloned().collect();
                report.gone = acked.keys().filter(|id| !groups.contains_key(id)).copied().collect();
            }
            _ => {
                self.since_full = 0;
                report.base = None;
                report.groups = groups.values().cloned().collect();
                report.gone = Vec::new();
            }
        }
        (report, Pending { seq, groups })
    }

    /// The leader answered `pending`: it holds it now, unless it could not
    /// build on the base (`need_full`), in which case the next is whole.
    pub fn answered(&mut self, pending: Pending, need_full: bool) {
        self.acked = (!need_full).then_some((pending.seq, pending.groups));
    }
}

/// The tracker's side: brings `recorded` — the number and groups of the
/// report recorded from the node last — to what the node holds after
/// `report`, in place (a copy of every group, from every node, every
/// second was the metadata leader's own idle cost at 10,000 shards).
/// `false`, leaving it as it was, when the report builds on something
/// else: the node must send a whole one.
pub fn apply(recorded: &mut Option<(u64, BTreeMap<u64, GroupReport>)>, report: &NodeReport) -> bool {
    let whole = match (report.base, recorded.as_ref()) {
        (None, _) => true,
        (Some(base), Some((seq, _))) if base == *seq => false,
        (Some(_), _) => return false,
    };
    let (seq, groups) = recorded.get_or_insert_with(Default::default);
    if whole {
        groups.clear();
    }
    *seq = report.seq;
    for id in &report.gone {
        groups.remove(id);
    }
    groups.extend(report.groups.iter().map(|g| (g.group, g.clone())));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(id: u64, applied: u64) -> GroupReport {
        GroupReport {
            group: id,
            replica_id: id * 10,
            is_leader: false,
            term: 1,
            applied: Some(applied),
            size_bytes: Some(0),
            keys: Some(0),
            qps: 0.0,
            voters: None,
        }
    }

    fn report(groups: Vec<GroupReport>) -> NodeReport {
        NodeReport {
            node_id: 1,
            raft_addr: String::new(),
            api_addr: String::new(),
            directory_version: 0,
            groups,
            seq: 0,
            base: None,
            gone: vec![],
            leaders_version: 0,
        }
    }

    /// The leader's side, keeping what it recorded.
    #[derive(Default)]
    struct Leader {
        recorded: Option<(u64, BTreeMap<u64, GroupReport>)>,
    }

    impl Leader {
        /// Whether the leader needs a whole report next.
        fn receive(&mut self, r: &NodeReport) -> bool {
            let before = self.recorded.clone();
            let applied = apply(&mut self.recorded, r);
            if !applied {
                assert_eq!(self.recorded, before, "a refused report changes nothing");
            }
            !applied
        }

        fn groups(&self) -> Vec<GroupReport> {
            self.recorded.as_ref().map(|(_, g)| g.values().cloned().collect()).unwrap_or_default()
        }
    }

    #[test]
    fn an_idle_node_sends_nothing_but_what_changed_and_the_leader_sees_it_whole() {
        let (mut node, mut leader) = (Reporter::default(), Leader::default());
        let all = |a: u64| (1..=100).map(|g| group(g, if g == 7 { a } else { 1 })).collect::<Vec<_>>();
        let (r, p) = node.prepare(report(all(1)));
        assert_eq!((r.base, r.groups.len()), (None, 100), "the first report is whole");
        let need = leader.receive(&r);
        node.answered(p, need);
        let (r, p) = node.prepare(report(all(1)));
        assert_eq!((r.base, r.groups.len(), r.gone.len()), (Some(1), 0, 0), "nothing changed: nothing sent");
        node.answered(p, leader.receive(&r));
        // Group 7 moves on, group 100 is gone.
        let mut now = all(2);
        now.pop();
        let (r, p) = node.prepare(report(now.clone()));
        assert_eq!(r.groups, vec![group(7, 2)]);
        assert_eq!(r.gone, vec![100]);
        node.answered(p, leader.receive(&r));
        assert_eq!(leader.groups(), now, "the leader holds exactly the node's groups");
    }

    #[test]
    fn a_report_that_builds_on_something_the_leader_lacks_is_refused_and_the_next_is_whole() {
        let (mut node, mut leader) = (Reporter::default(), Leader::default());
        let (r, p) = node.prepare(report(vec![group(1, 1)]));
        node.answered(p, leader.receive(&r));
        // A new metadata leader knows nothing.
        let mut fresh = Leader::default();
        let (r, p) = node.prepare(report(vec![group(1, 2)]));
        assert!(r.base.is_some());
        let need = fresh.receive(&r);
        assert!(need, "a difference against nothing is refused");
        node.answered(p, need);
        let (r, p) = node.prepare(report(vec![group(1, 2)]));
        assert_eq!(r.base, None, "whole after a refusal");
        node.answered(p, fresh.receive(&r));
        assert_eq!(fresh.groups(), vec![group(1, 2)]);
        // An answer lost on the way: the node builds on an older report than
        // the leader recorded; the leader refuses rather than guess.
        let (r, _lost) = node.prepare(report(vec![group(1, 3)]));
        assert!(!fresh.receive(&r));
        let (r, p) = node.prepare(report(vec![group(1, 4)]));
        assert!(fresh.receive(&r), "built on a report the leader has moved past");
        node.answered(p, true);
        let (r, _) = node.prepare(report(vec![group(1, 4)]));
        assert_eq!(r.base, None);
    }

    #[test]
    fn a_whole_report_goes_out_regularly() {
        let (mut node, mut leader) = (Reporter::default(), Leader::default());
        let mut whole = 0;
        for _ in 0..(FULL_EVERY * 3) {
            let (r, p) = node.prepare(report(vec![group(1, 1)]));
            whole += usize::from(r.base.is_none());
            node.answered(p, leader.receive(&r));
        }
        assert_eq!(whole, 3);
    }
}
