//! The metadata leader's duties that are not Raft entries: tracking node
//! liveness and shard leadership from heartbeats, and answering for the
//! cluster as a whole.
//!
//! Every node sends a [`Heartbeat`] about once a second. Whichever node
//! receives it forwards it to the metadata leader, which records it in its
//! [`Tracker`] (memory only: liveness changes every second and must not be
//! written through Raft), registers new addresses in the directory, and
//! answers with the directory (when the sender's copy is older) and the
//! current shard leaders. A new metadata leader starts with an empty tracker
//! and fills it within one heartbeat interval.
//!
//! openraft keeps a leader in `ServerState::Leader` for as long as a
//! partition lasts, so believing to lead is not enough to act: every side
//! effect of metadata leadership — answering heartbeats (with the directory
//! and leader hints), answering cluster views, the operation drivers, the
//! rebalancers — first asks [`Node::confirmed_meta_leader`], which confirms
//! leadership with a read-index round of group 0 and caches the
//! confirmation for half an election timeout. The tracker is reset whenever
//! a confirmation comes in a new term of group 0, so a node that leads again
//! after a while never judges liveness from what it heard in an older term.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cleave_metadata::api::{Liveness, NodeCondition, NodeStatus, ShardStatus};
use cleave_metadata::{MetaCommand, NodeId, META_GROUP};

use crate::node::Node;
use crate::rpc::{ClusterView, ExecError, GroupReport, Heartbeat, HeartbeatAck, NodeReply, NodeRequest};

/// Silence after which a node is suspect, and after which it is down.
const SUSPECT_AFTER: Duration = Duration::from_secs(3);
const DOWN_AFTER: Duration = Duration::from_secs(10);

#[derive(Default)]
struct TrackerInner {
    seen: HashMap<NodeId, (Instant, Vec<GroupReport>)>,
    /// group → (term, node) of the newest leader claim.
    leaders: HashMap<u64, (u64, NodeId)>,
    since: Option<Instant>,
    /// The term of group 0 in which this tracker records (this node leads).
    term: Option<u64>,
    /// When the newest read-index round confirming leadership in `term` started.
    confirmed_at: Option<Instant>,
}

/// Heartbeat bookkeeping of the metadata leader.
#[derive(Default)]
pub struct Tracker {
    inner: Mutex<TrackerInner>,
}

impl Tracker {
    /// Whether leadership in `term` was confirmed less than `valid` ago.
    fn confirmed(&self, term: u64, valid: Duration) -> bool {
        let t = self.inner.lock().unwrap();
        t.term == Some(term) && t.confirmed_at.is_some_and(|at| at.elapsed() < valid)
    }

    /// Records a confirmation of leadership in `term` by a round that
    /// started at `started`. A new term starts the tracker afresh: nothing
    /// heard in an earlier term (before leadership was lost) counts.
    /// Forgets the cached confirmation (leadership is being handed away).
    pub fn unconfirm(&self) {
        self.inner.lock().unwrap().confirmed_at = None;
    }

    /// A confirmation after a lapse longer than `lapse` (leadership could
    /// not be confirmed for that long — the quorum was out of reach, even if
    /// the term did not change) starts afresh too: heartbeats were not
    /// recorded meanwhile, so their ages say nothing about the nodes.
    fn confirm(&self, term: u64, started: Instant, lapse: Duration) {
        let mut t = self.inner.lock().unwrap();
        let lapsed = t.confirmed_at.is_some_and(|at| started.saturating_duration_since(at) > lapse);
        if t.term != Some(term) || lapsed {
            tracing::info!(term, lapsed, "leading the metadata group anew: liveness starts afresh");
            *t = TrackerInner { term: Some(term), since: Some(Instant::now()), ..Default::default() };
        }
        if t.confirmed_at.is_none_or(|at| at < started) {
            t.confirmed_at = Some(started);
        }
    }

    fn record(&self, hb: &Heartbeat) {
        let mut t = self.inner.lock().unwrap();
        t.since.get_or_insert_with(Instant::now);
        for g in &hb.groups {
            if g.is_leader {
                let e = t.leaders.entry(g.group).or_insert((g.term, hb.node_id));
                if g.term >= e.0 {
                    *e = (g.term, hb.node_id);
                }
            } else if t.leaders.get(&g.group).is_some_and(|(_, n)| *n == hb.node_id) {
                t.leaders.remove(&g.group);
            }
        }
        t.seen.insert(hb.node_id, (Instant::now(), hb.groups.clone()));
    }

    pub fn leaders(&self) -> Vec<(u64, NodeId)> {
        let t = self.inner.lock().unwrap();
        let mut v: Vec<_> = t.leaders.iter().map(|(g, (_, n))| (*g, *n)).collect();
        v.sort();
        v
    }

    fn liveness(&self, node: NodeId) -> (Liveness, Option<u64>) {
        let t = self.inner.lock().unwrap();
        match t.seen.get(&node) {
            Some((at, _)) => {
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
            Some((at, _)) => at.elapsed(),
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
        t.seen.iter().filter(|(_, (at, _))| at.elapsed() < SUSPECT_AFTER).map(|(n, _)| *n).collect()
    }

    /// The latest report of `group` from its leader, if known.
    pub fn leader_report(&self, group: u64) -> Option<GroupReport> {
        let leader = self.inner.lock().unwrap().leaders.get(&group).map(|(_, n)| *n)?;
        self.report(leader, group)
    }

    pub fn report(&self, node: NodeId, group: u64) -> Option<GroupReport> {
        let t = self.inner.lock().unwrap();
        t.seen.get(&node).and_then(|(_, gs)| gs.iter().find(|g| g.group == group).cloned())
    }

    /// The replicas `node` said it holds, `(group, replica)`, in its newest
    /// heartbeat of this term, if it reported at all.
    pub fn held(&self, node: NodeId) -> Option<Vec<(u64, u64)>> {
        let t = self.inner.lock().unwrap();
        t.seen.get(&node).map(|(_, gs)| gs.iter().map(|g| (g.group, g.replica_id)).collect())
    }
}

impl Node {
    /// Whether this node believes it leads the metadata group (openraft's
    /// state). Not enough to act on: see [`Node::confirmed_meta_leader`].
    pub fn is_meta_leader(&self) -> bool {
        self.group(META_GROUP).is_some_and(|g| g.status().is_leader)
    }

    /// Whether this node leads the metadata group *now*: it believes so and
    /// a quorum of group 0 confirmed it (a read-index round) less than half
    /// an election timeout ago — no other leader can have been elected
    /// since. Confirms again when the last confirmation is older. Every
    /// side effect of metadata leadership is gated on this.
    pub async fn confirmed_meta_leader(&self) -> bool {
        let Some(g) = self.group(META_GROUP) else { return false };
        let term = g.status().term;
        if !g.status().is_leader {
            return false;
        }
        let timeout = Duration::from_millis(self.ctx.settings.election_timeout_ms.max(2));
        let valid = timeout / 2;
        if self.tracker.confirmed(term, valid) {
            return true;
        }
        // One round at a time; whoever waited may find it done.
        let _one = self.meta_confirm.lock().await;
        if self.tracker.confirmed(term, valid) {
            return true;
        }
        let started = Instant::now();
        match tokio::time::timeout(timeout, g.read_barrier()).await {
            Ok(Ok(())) => {
                let s = g.status();
                if s.is_leader && s.term == term {
                    self.tracker.confirm(term, started, valid * 4);
                    return true;
                }
                false
            }
            Ok(Err(e)) => {
                tracing::debug!(term, "metadata leadership not confirmed: {e}");
                false
            }
            Err(_) => {
                tracing::info!(term, "metadata leadership not confirmed in time: no quorum of group 0");
                false
            }
        }
    }

    /// This node's heartbeat.
    pub fn heartbeat(&self) -> Heartbeat {
        let elapsed = {
            let mut last = self.last_report.lock().unwrap();
            let e = last.elapsed().as_secs_f64().max(0.001);
            *last = Instant::now();
            e
        };
        let groups = self
            .groups()
            .iter()
            .map(|g| {
                let s = g.status();
                GroupReport {
                    group: g.group,
                    replica_id: g.replica_id,
                    is_leader: s.is_leader,
                    term: s.term,
                    applied: s.applied,
                    size_bytes: (g.group != META_GROUP).then(|| g.size_bytes()),
                    keys: (g.group != META_GROUP).then(|| g.keys()),
                    qps: g.served.swap(0, Ordering::Relaxed) as f64 / elapsed,
                    voters: s
                        .is_leader
                        .then(|| g.membership().configs.iter().map(|c| c.iter().copied().collect()).collect()),
                }
            })
            .collect();
        Heartbeat {
            node_id: self.id,
            raft_addr: self.settings.raft_addr.clone(),
            api_addr: self.settings.api_addr.clone(),
            directory_version: self.directory().version,
            groups,
        }
    }

    /// Records a heartbeat (as confirmed metadata leader) or passes it on
    /// towards the leader. A leader that cannot confirm its leadership does
    /// not answer with its possibly frozen directory.
    pub async fn handle_heartbeat(&self, hb: Heartbeat, hops: u8) -> Result<HeartbeatAck, ExecError> {
        if !self.confirmed_meta_leader().await {
            let leader = self.group(META_GROUP).and_then(|g| g.status().leader).map(|l| l.node_id);
            let reply = self.forward_meta(hops, leader, |hops| NodeRequest::Heartbeat { hb: hb.clone(), hops }).await?;
            return match reply {
                NodeReply::Heartbeat(ack) => Ok(ack),
                other => Err(ExecError::Internal(format!("unexpected reply {other:?}"))),
            };
        }
        self.tracker.record(&hb);
        let dir = self.directory();
        let known = dir.nodes.get(&hb.node_id);
        let changed =
            known.is_none_or(|n| n.raft_addr != hb.raft_addr || n.api_addr.as_deref() != Some(hb.api_addr.as_str()));
        // A removed node may still run; it cannot register again.
        let removed = known.is_some_and(|n| n.state == cleave_metadata::NodeState::Removed);
        if changed && !removed {
            let cmd = MetaCommand::RegisterNode {
                node_id: Some(hb.node_id),
                raft_addr: hb.raft_addr.clone(),
                api_addr: Some(hb.api_addr.clone()),
            };
            if let Err(e) = self.propose_meta(cmd, 0).await {
                tracing::warn!(node = hb.node_id, "registering node addresses: {e}");
            }
        }
        let dir = self.directory();
        Ok(HeartbeatAck {
            directory: (dir.version > hb.directory_version).then(|| (*dir).clone()),
            leaders: self.tracker.leaders(),
        })
    }

    /// Sends `req` towards the metadata leader.
    async fn forward_meta(
        &self,
        hops: u8,
        leader: Option<NodeId>,
        req: impl Fn(u8) -> NodeRequest,
    ) -> Result<NodeReply, ExecError> {
        if hops >= 3 {
            return Err(ExecError::NoLeader { group: META_GROUP });
        }
        // The leader named first, then every other place the metadata
        // group may be (a leader that lost its quorum answers with an
        // error, and the next one is tried).
        let mut targets: Vec<String> =
            leader.filter(|n| *n != self.id).and_then(|n| self.raft_addr_of(n)).into_iter().collect();
        for a in self.candidates(META_GROUP) {
            if !targets.contains(&a) {
                targets.push(a);
            }
        }
        let mut last = ExecError::NoLeader { group: META_GROUP };
        for addr in targets {
            match self.call(&addr, req(hops + 1), Duration::from_secs(5)).await {
                // Only "not here": the next place may lead. An answer (an
                // error included: a refused split is a 400) is the answer,
                // and a timeout may have applied a proposal: never sent on.
                Err(e @ (ExecError::Unavailable(_) | ExecError::NoLeader { .. })) => last = e,
                r => return r,
            }
        }
        Err(last)
    }

    /// Sends `req` to the metadata leader (from a non-leader).
    pub async fn forward_to_meta_leader(
        &self,
        hops: u8,
        req: impl Fn(u8) -> NodeRequest,
    ) -> Result<NodeReply, ExecError> {
        let leader = self.group(META_GROUP).and_then(|g| g.status().leader).map(|l| l.node_id);
        self.forward_meta(hops, leader, req).await
    }

    /// Sends a heartbeat now and adopts what the answer carries.
    pub async fn beat(&self) -> Result<(), ExecError> {
        let ack = self.handle_heartbeat(self.heartbeat(), 0).await?;
        if let Some(d) = ack.directory {
            self.install_directory(d);
        }
        self.set_leader_hints(&ack.leaders);
        Ok(())
    }

    /// Fetches the newest directory from the metadata leader.
    pub async fn refresh_directory(&self) {
        if let Err(e) = self.beat().await {
            tracing::debug!("directory refresh: {e}");
        }
    }

    /// The cluster as the (confirmed) metadata leader sees it.
    pub async fn cluster_view(&self, hops: u8) -> Result<ClusterView, ExecError> {
        if !self.confirmed_meta_leader().await {
            let leader = self.group(META_GROUP).and_then(|g| g.status().leader).map(|l| l.node_id);
            return match self.forward_meta(hops, leader, |hops| NodeRequest::ClusterView { hops }).await? {
                NodeReply::ClusterView(v) => Ok(v),
                other => Err(ExecError::Internal(format!("unexpected reply {other:?}"))),
            };
        }
        // Our own report is always current.
        self.tracker.record(&self.heartbeat());
        let directory = (*self.directory()).clone();
        let leaders = self.tracker.leaders();
        let leader_of: HashMap<u64, NodeId> = leaders.iter().copied().collect();
        let mut liveness = Vec::new();
        let nodes = directory
            .nodes
            .values()
            .map(|n| {
                let (l, ms) = self.tracker.liveness(n.id);
                liveness.push((n.id, l));
                NodeStatus {
                    id: n.id,
                    raft_addr: n.raft_addr.clone(),
                    api_addr: n.api_addr.clone(),
                    status: NodeCondition::of(n.state, l),
                    state: n.state,
                    liveness: l,
                    last_heartbeat_ms: ms,
                    replicas: directory.groups_on(n.id).count(),
                    leaders: leader_of.values().filter(|x| **x == n.id).count(),
                }
            })
            .collect();
        let shards = directory
            .shards
            .values()
            .map(|s| {
                let leader = leader_of.get(&s.shard_id).copied();
                let report = leader.and_then(|n| self.tracker.report(n, s.shard_id));
                ShardStatus {
                    shard_id: s.shard_id,
                    leader,
                    replicas: s.replicas.clone(),
                    conf_version: s.conf_version,
                    size_bytes: report.as_ref().and_then(|r| r.size_bytes),
                    keys: report.as_ref().and_then(|r| r.keys),
                    qps: report.as_ref().map(|r| r.qps),
                    applied_index: report.as_ref().and_then(|r| r.applied),
                    raft_voters: report.and_then(|r| r.voters),
                }
            })
            .collect();
        Ok(ClusterView { directory, nodes, shards, leaders, liveness })
    }
}

/// Sends this node's heartbeat every `--node-heartbeat-ms`, forever; with
/// the directory just confirmed by the metadata leader, collects replicas it
/// no longer lists.
pub async fn heartbeat_loop(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut collector = crate::moves::gc::Collector::default();
    loop {
        tick.tick().await;
        match node.beat().await {
            Ok(()) => {
                // Persisted before GC acts on it: the floor GC trusts from.
                match node.remember_directory() {
                    Ok(()) => crate::moves::gc::collect(&node, &mut collector).await,
                    Err(e) => tracing::warn!("persisting cluster.json: {e:#}"),
                }
            }
            Err(e) => tracing::debug!("heartbeat: {e}"),
        }
        crate::metrics::update_gauges(&node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(node: NodeId) -> Heartbeat {
        Heartbeat {
            node_id: node,
            raft_addr: String::new(),
            api_addr: String::new(),
            directory_version: 0,
            groups: vec![],
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
