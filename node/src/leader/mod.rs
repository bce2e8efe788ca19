//! The metadata leader's duties that are not Raft entries: knowing it
//! leads, tracking node liveness and shard leadership from heartbeats, and
//! answering for the cluster as a whole.
//!
//! Every node sends a [`NodeReport`] about once a second — by difference
//! with the last one the leader acknowledged ([`delta`]). Whichever node
//! receives it forwards it to the metadata leader, which records it in its
//! [`Tracker`], registers new addresses in the directory, and answers with
//! the directory (when the sender's copy is older) and the current shard
//! leaders (when the sender's copy is another). A new metadata leader starts with an empty tracker and fills it
//! within one heartbeat interval.
//!
//! openraft keeps a leader in `ServerState::Leader` for as long as a
//! partition lasts, so believing to lead is not enough to act: every side
//! effect of metadata leadership — answering heartbeats (with the directory
//! and leader hints), answering cluster views, the operations supervisor,
//! the balancing loops — first asks [`MetaLeader::confirmed`], which
//! confirms leadership with a read-index round of group 0 and caches the
//! confirmation for half an election timeout. The tracker is reset whenever
//! a confirmation comes in a new term of group 0, so a node that leads again
//! after a while never judges liveness from what it heard in an older term.

pub mod delta;
mod tracker;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cleave_metadata::api::{NodeCondition, NodeStatus, ShardStatus};
use cleave_metadata::{MetaCommand, NodeId, META_GROUP};

pub use tracker::Tracker;

use crate::node::Node;
use crate::rpc::{self, ClusterView, ExecError, GroupReport, HeartbeatAck, NodeCall, NodeReport};

/// What a node keeps for its duties as metadata leader.
pub struct LeaderState {
    /// Liveness and group reports; meaningful while this node leads group 0.
    tracker: Tracker,
    /// Serialises the read-index rounds that confirm metadata leadership.
    confirm: tokio::sync::Mutex<()>,
    /// When this node last built a heartbeat (for request rates).
    last_report: Mutex<Instant>,
    /// What this node told the metadata leader (reports by difference).
    reporter: Mutex<delta::Reporter>,
}

impl Default for LeaderState {
    fn default() -> Self {
        LeaderState {
            tracker: Tracker::default(),
            confirm: Default::default(),
            last_report: Mutex::new(Instant::now()),
            reporter: Mutex::default(),
        }
    }
}

/// A node's duties towards the metadata group's leadership: see the module.
pub struct MetaLeader<'a> {
    node: &'a Node,
    state: &'a LeaderState,
}

impl<'a> MetaLeader<'a> {
    pub(crate) fn new(node: &'a Node, state: &'a LeaderState) -> Self {
        MetaLeader { node, state }
    }

    /// What this node heard from the others (as metadata leader).
    pub fn tracker(&self) -> &'a Tracker {
        &self.state.tracker
    }
}

impl MetaLeader<'_> {
    /// Whether this node believes it leads the metadata group (openraft's
    /// state). Not enough to act on: see [`MetaLeader::confirmed`].
    pub fn is_leader(&self) -> bool {
        self.node.group(META_GROUP).is_some_and(|g| g.status().is_leader)
    }

    /// Whether this node leads the metadata group *now*: it believes so and
    /// a quorum of group 0 confirmed it (a read-index round) less than half
    /// an election timeout ago — no other leader can have been elected
    /// since. Confirms again when the last confirmation is older. Every
    /// side effect of metadata leadership is gated on this.
    pub async fn confirmed(&self) -> bool {
        let Some(g) = self.node.group(META_GROUP) else { return false };
        let term = g.status().term;
        if !g.status().is_leader {
            return false;
        }
        let timeout = Duration::from_millis(self.node.ctx().settings.election_timeout_ms.max(2));
        let valid = timeout / 2;
        if self.state.tracker.confirmed(term, valid) {
            return true;
        }
        // One round at a time; whoever waited may find it done.
        let _one = self.state.confirm.lock().await;
        if self.state.tracker.confirmed(term, valid) {
            return true;
        }
        let started = Instant::now();
        match tokio::time::timeout(timeout, g.read_barrier()).await {
            Ok(Ok(())) => {
                let s = g.status();
                if s.is_leader && s.term == term {
                    self.state.tracker.confirm(term, started, valid * 4);
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

    /// This node's heartbeat, whole (see [`delta::Reporter`] for what is sent).
    pub fn report(&self) -> NodeReport {
        let elapsed = {
            let mut last = self.state.last_report.lock().unwrap();
            let e = last.elapsed().as_secs_f64().max(0.001);
            *last = Instant::now();
            e
        };
        let groups = self
            .node
            .groups()
            .in_service()
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
        NodeReport {
            node_id: self.node.id(),
            raft_addr: self.node.settings().raft_addr.clone(),
            api_addr: self.node.settings().api_addr.clone(),
            directory_version: self.node.directory().version,
            groups,
            seq: 0,
            base: None,
            gone: Vec::new(),
            leaders_version: 0,
        }
    }

    /// Records a heartbeat (as confirmed metadata leader) or passes it on
    /// towards the leader. A leader that cannot confirm its leadership does
    /// not answer with its possibly frozen directory.
    pub async fn handle_heartbeat(&self, hb: NodeReport, hops: u8) -> Result<HeartbeatAck, ExecError> {
        if !self.confirmed().await {
            let leader = self.node.group(META_GROUP).and_then(|g| g.status().leader).map(|l| l.node_id);
            return self.forward(hops, leader, |hops| rpc::Heartbeat { hb: hb.clone(), hops }).await;
        }
        let recorded = self.state.tracker.record(&hb);
        let dir = self.node.directory();
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
            if let Err(e) = self.node.router().propose_meta(cmd, 0).await {
                tracing::warn!(node = hb.node_id, "registering node addresses: {e}");
            }
        }
        let dir = self.node.directory();
        let leaders_version = self.state.tracker.leaders_version();
        let (leaders_version, leaders) = if leaders_version == hb.leaders_version {
            (leaders_version, None)
        } else {
            let (v, l) = self.state.tracker.leaders_versioned();
            (v, Some(l))
        };
        Ok(HeartbeatAck {
            directory: (dir.version > hb.directory_version).then(|| (*dir).clone()),
            leaders,
            leaders_version,
            need_full: !recorded,
        })
    }

    /// Sends `req` towards the metadata leader.
    async fn forward<R: NodeCall>(
        &self,
        hops: u8,
        leader: Option<NodeId>,
        req: impl Fn(u8) -> R,
    ) -> Result<R::Reply, ExecError> {
        if hops >= 3 {
            return Err(ExecError::NoLeader { group: META_GROUP });
        }
        // The leader named first, then every other place the metadata
        // group may be (a leader that lost its quorum answers with an
        // error, and the next one is tried).
        let (dir, cache) = (self.node.directory(), self.node.dir_cache());
        let mut targets: Vec<String> =
            leader.filter(|n| *n != self.node.id()).and_then(|n| cache.raft_addr_of(&dir, n)).into_iter().collect();
        for a in cache.candidates(&dir, META_GROUP) {
            if !targets.contains(&a) {
                targets.push(a);
            }
        }
        let mut last = ExecError::NoLeader { group: META_GROUP };
        for addr in targets {
            match self.node.router().call(&addr, req(hops + 1), Duration::from_secs(5)).await {
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
    pub async fn forward_to_leader<R: NodeCall>(&self, hops: u8, req: impl Fn(u8) -> R) -> Result<R::Reply, ExecError> {
        let leader = self.node.group(META_GROUP).and_then(|g| g.status().leader).map(|l| l.node_id);
        self.forward(hops, leader, req).await
    }

    /// Sends a heartbeat now and adopts what the answer carries.
    pub async fn beat(&self) -> Result<(), ExecError> {
        let (report, pending) = self.state.reporter.lock().unwrap().prepare(self.report());
        let ack = self.handle_heartbeat(report, 0).await?;
        let mut reporter = self.state.reporter.lock().unwrap();
        reporter.answered(pending, ack.need_full);
        if let Some(d) = ack.directory {
            self.node.dir_cache().install(d);
        }
        if let Some(leaders) = &ack.leaders {
            self.node.dir_cache().set_leader_hints(leaders);
            reporter.leaders_version = ack.leaders_version;
        }
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
        if !self.confirmed().await {
            let leader = self.node.group(META_GROUP).and_then(|g| g.status().leader).map(|l| l.node_id);
            return self.forward(hops, leader, |hops| rpc::GetClusterView { hops }).await;
        }
        // Our own report is always current.
        if let Err(e) = self.beat().await {
            tracing::debug!("own heartbeat for a cluster view: {e}");
        }
        let directory = (*self.node.directory()).clone();
        let leaders = self.state.tracker.leaders();
        let leader_of: HashMap<u64, NodeId> = leaders.iter().copied().collect();
        let mut liveness = Vec::new();
        let nodes = directory
            .nodes
            .values()
            .map(|n| {
                let (l, ms) = self.state.tracker.liveness(n.id);
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
                let report = leader.and_then(|n| self.state.tracker.report(n, s.shard_id));
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
