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
}

/// Heartbeat bookkeeping of the metadata leader.
#[derive(Default)]
pub struct Tracker {
    inner: Mutex<TrackerInner>,
}

impl Tracker {
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
}

impl Node {
    /// Whether this node currently leads the metadata group.
    pub fn is_meta_leader(&self) -> bool {
        self.group(META_GROUP).is_some_and(|g| g.status().is_leader)
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

    /// Records a heartbeat (as metadata leader) or passes it on to the leader.
    pub async fn handle_heartbeat(&self, hb: Heartbeat, hops: u8) -> Result<HeartbeatAck, ExecError> {
        if !self.is_meta_leader() {
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
        let targets = match leader.filter(|n| *n != self.id).and_then(|n| self.raft_addr_of(n)) {
            Some(a) => vec![a],
            None => self.candidates(META_GROUP),
        };
        let mut last = ExecError::NoLeader { group: META_GROUP };
        for addr in targets {
            match self.call(&addr, req(hops + 1), Duration::from_secs(5)).await {
                Ok(r) => return Ok(r),
                Err(e) => last = e,
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

    /// The cluster as the metadata leader sees it.
    pub async fn cluster_view(&self, hops: u8) -> Result<ClusterView, ExecError> {
        if !self.is_meta_leader() {
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
            Ok(()) => crate::moves::gc::collect(&node, &mut collector).await,
            Err(e) => tracing::debug!("heartbeat: {e}"),
        }
        crate::metrics::update_gauges(&node);
    }
}
