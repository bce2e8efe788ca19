//! A running node: the groups it hosts, its view of the directory, and how
//! it starts — bootstrapping a new cluster, rejoining from its data
//! directory, or joining an existing cluster.
//!
//! A node's identity (its id and how it was founded) is kept in
//! `node.json` in the data directory, so the same command line restarts it
//! and a restart needs nothing but the directory.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cleave_metadata::{Directory, NodeId, META_GROUP};
use serde::{Deserialize, Serialize};

use crate::kv::ShardState;
use crate::meta::Tracker;
use crate::raft::{GroupRaft, RaftContext, ReplicaNode, SmState};
use crate::rpc::{self, ExecError, NodeRequest, Request, Response};

/// What a node needs to know about itself to run.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub id: Option<NodeId>,
    pub data_dir: PathBuf,
    /// Addresses other nodes and clients use to reach this one.
    pub api_addr: String,
    pub raft_addr: String,
    /// `(id, raft address)` of every founding node, for a new cluster.
    pub initial_cluster: Vec<(NodeId, String)>,
    /// API address of a node of an existing cluster to join.
    pub join: Option<String>,
    pub replication: usize,
    pub max_value_bytes: usize,
    pub write_timeout: Duration,
    /// How often the node reports to the metadata leader.
    pub heartbeat: Duration,
}

/// The persisted identity in `node.json`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Identity {
    pub node_id: NodeId,
    /// Raft addresses to ask for the metadata leader when the directory is unknown.
    pub seeds: Vec<String>,
}

/// What a node remembers of the cluster across restarts, in `cluster.json`:
/// the newest directory version it has seen and where the metadata group
/// was then. A node that does not host the metadata group finds it again
/// from here after a restart, even once the founding nodes (its seeds) are
/// gone; and replica GC never trusts a directory older than that version.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterHints {
    /// The newest directory version seen: the one installed, or the one a
    /// replica-creating request said already lists the new replica.
    pub directory_version: u64,
    /// RPC addresses of the metadata group's replicas, newest known.
    pub meta_members: Vec<String>,
    /// RPC addresses of the other nodes not removed (any of them forwards
    /// to the metadata leader): a last resort.
    pub nodes: Vec<String>,
}

impl ClusterHints {
    fn load(path: &std::path::Path) -> anyhow::Result<ClusterHints> {
        match std::fs::read(path) {
            Ok(b) => Ok(serde_json::from_slice(&b).with_context(|| format!("reading {}", path.display()))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClusterHints::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the hints durably: a temporary file, fsync'd, renamed over
    /// the old one, then the folder fsync'd.
    fn save(&self, path: &std::path::Path) -> anyhow::Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// A running node, shared by the API server, the RPC server and background tasks.
pub struct Node {
    pub id: NodeId,
    pub settings: NodeSettings,
    pub ctx: RaftContext,
    /// The founding nodes (or, after `--join`, the metadata replicas then).
    pub seeds: Vec<String>,
    /// Persisted in `cluster.json` (see [`ClusterHints`]).
    hints: std::sync::Mutex<ClusterHints>,
    /// Serialises the read-index rounds that confirm metadata leadership.
    pub(crate) meta_confirm: tokio::sync::Mutex<()>,
    groups: RwLock<HashMap<u64, Arc<GroupRaft>>>,
    directory: RwLock<Arc<Directory>>,
    /// Shard leaders as last reported by the metadata leader: group → node.
    leader_hints: RwLock<HashMap<u64, NodeId>>,
    /// Liveness and group reports; meaningful while this node leads group 0.
    pub tracker: Tracker,
    pub started: Instant,
    /// When this node last built a heartbeat (for request rates).
    pub last_report: std::sync::Mutex<Instant>,
    /// Split forwarders running here (as a source shard's leader).
    pub forwarders: crate::split::forwarder::Forwarders,
    /// Operations driven here (as metadata leader).
    pub drivers: crate::split::driver::Drivers,
    /// Serialises creating and destroying local replicas.
    pub group_lifecycle: tokio::sync::Mutex<()>,
}

impl Node {
    /// Opens the node's data directory and starts (or creates) its groups.
    /// `published` receives the node as soon as it exists, before its
    /// groups open, so the RPC server can route Raft traffic to groups as
    /// they come up.
    pub async fn start(
        settings: NodeSettings,
        ctx: RaftContext,
        published: &tokio::sync::OnceCell<Arc<Node>>,
    ) -> anyhow::Result<Arc<Node>> {
        let id_path = settings.data_dir.join("node.json");
        let existing: Option<Identity> = match std::fs::read(&id_path) {
            Ok(b) => Some(serde_json::from_slice(&b).context("reading node.json")?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).context("reading node.json"),
        };
        let (identity, fresh) = match existing {
            Some(identity) => {
                if settings.id.is_some_and(|id| id != identity.node_id) {
                    bail!("data directory belongs to node {}, not {}", identity.node_id, settings.id.unwrap_or(0));
                }
                (identity, false)
            }
            None if !settings.initial_cluster.is_empty() => {
                let Some(id) = settings.id else { bail!("--id is required with --initial-cluster") };
                if !settings.initial_cluster.iter().any(|(n, _)| *n == id) {
                    bail!("node {id} is not in --initial-cluster");
                }
                let seeds = settings.initial_cluster.iter().map(|(_, a)| a.clone()).collect();
                (Identity { node_id: id, seeds }, true)
            }
            None => match &settings.join {
                Some(addr) => (crate::join::join(&settings, addr).await?, false),
                None => bail!("a new node needs --initial-cluster or --join"),
            },
        };
        let hints = ClusterHints::load(&settings.data_dir.join("cluster.json"))?;
        let node = Arc::new(Node {
            id: identity.node_id,
            seeds: identity.seeds.clone(),
            hints: std::sync::Mutex::new(hints),
            meta_confirm: Default::default(),
            settings: settings.clone(),
            ctx,
            groups: RwLock::default(),
            directory: RwLock::new(Arc::new(Directory::default())),
            leader_hints: RwLock::default(),
            tracker: Tracker::default(),
            started: Instant::now(),
            last_report: std::sync::Mutex::new(Instant::now()),
            forwarders: Default::default(),
            drivers: Default::default(),
            group_lifecycle: Default::default(),
        });
        // Requests to create or destroy a replica can arrive as soon as the
        // node is published; they wait until every recorded group is open
        // (a destroy racing with the opening of that very group made a
        // restarted node fail to open it, and exit). So the lock is taken
        // before the node is published, never after.
        let lifecycle = node.group_lifecycle.lock().await;
        let _ = published.set(node.clone());
        let held = GroupRaft::list(&node.ctx.db)?;
        GroupRaft::remove_orphan_snapshots(&node.ctx, &held)?;
        for desc in held {
            let g = GroupRaft::open(&node.ctx, desc.clone())
                .await
                .with_context(|| format!("opening group {}", desc.group))?;
            node.groups.write().unwrap().insert(desc.group, Arc::new(g));
        }
        if fresh && node.groups.read().unwrap().is_empty() {
            node.bootstrap().await?;
        }
        drop(lifecycle);
        std::fs::write(&id_path, serde_json::to_vec_pretty(&identity)?).context("writing node.json")?;
        Ok(node)
    }

    /// Creates this node's replicas of a brand-new cluster's groups.
    async fn bootstrap(&self) -> anyhow::Result<()> {
        let dir = Directory::bootstrap(&self.settings.initial_cluster, self.settings.replication);
        for g in dir.groups_on(self.id).cloned().collect::<Vec<_>>() {
            let replica = g.replica_on(self.id).expect("groups_on").replica_id;
            let state = if g.shard_id == META_GROUP {
                SmState::Meta(dir.clone())
            } else {
                SmState::Shard(ShardState { ranges: dir.ranges_of(g.shard_id), ..Default::default() })
            };
            let raft = GroupRaft::create(&self.ctx, g.shard_id, replica, state).await?;
            let members: BTreeMap<_, _> = g
                .replicas
                .iter()
                .map(|r| {
                    (
                        r.replica_id,
                        ReplicaNode { node_id: r.node_id, raft_addr: dir.nodes[&r.node_id].raft_addr.clone() },
                    )
                })
                .collect();
            // The lowest founding node initialises the group (and so stands
            // for election) at once; the others only if it does not show up.
            if g.replicas.first().map(|r| r.node_id) == Some(self.id) {
                raft.initialize(members).await?;
            } else {
                raft.initialize_later(members, crate::split::steps::FALLBACK_INIT);
            }
            self.groups.write().unwrap().insert(g.shard_id, Arc::new(raft));
        }
        tracing::info!(node = self.id, "bootstrapped a new cluster");
        Ok(())
    }

    /// This node's replica of group `id`, unless a storage error stopped it
    /// (a failed replica is out of service: see `GroupSm::fail`).
    pub fn group(&self, id: u64) -> Option<Arc<GroupRaft>> {
        self.groups.read().unwrap().get(&id).filter(|g| !g.is_failed()).cloned()
    }

    /// The replica of group `id` held here, failed or not (for creating and
    /// destroying replicas, which must see every replica on disk).
    pub fn held_replica(&self, id: u64) -> Option<Arc<GroupRaft>> {
        self.groups.read().unwrap().get(&id).cloned()
    }

    pub fn insert_group(&self, g: GroupRaft) {
        self.groups.write().unwrap().insert(g.group, Arc::new(g));
    }

    pub fn remove_group(&self, id: u64) -> Option<Arc<GroupRaft>> {
        self.groups.write().unwrap().remove(&id)
    }

    pub fn groups(&self) -> Vec<Arc<GroupRaft>> {
        let mut v: Vec<_> = self.groups.read().unwrap().values().filter(|g| !g.is_failed()).cloned().collect();
        v.sort_by_key(|g| g.group);
        v
    }

    /// The newest directory this node knows: its own metadata replica's, or
    /// the last one the metadata leader sent.
    pub fn directory(&self) -> Arc<Directory> {
        if let Some(meta) = self.group(META_GROUP) {
            let local_version = match &*meta.state.read().unwrap() {
                SmState::Meta(d) => d.version,
                SmState::Shard(_) => 0,
            };
            if local_version > self.directory.read().unwrap().version {
                if let SmState::Meta(d) = &*meta.state.read().unwrap() {
                    self.install_directory(d.clone());
                }
            }
        }
        self.directory.read().unwrap().clone()
    }

    /// Adopts `d` if it is newer than what this node has.
    pub fn install_directory(&self, d: Directory) {
        let mut cur = self.directory.write().unwrap();
        if d.version > cur.version {
            self.ctx.addresses.update(&d);
            *cur = Arc::new(d);
        }
    }

    /// The newest directory version this node has ever seen (persisted).
    pub fn directory_floor(&self) -> u64 {
        self.hints.lock().unwrap().directory_version
    }

    /// Persists what the current directory says about the cluster, if it
    /// is newer than what `cluster.json` holds.
    pub fn remember_directory(&self) -> anyhow::Result<()> {
        let dir = self.directory();
        let mut hints = self.hints.lock().unwrap();
        if dir.version <= hints.directory_version {
            return Ok(());
        }
        let addr = |n: &NodeId| dir.nodes.get(n).map(|d| d.raft_addr.clone());
        let mut next = ClusterHints {
            directory_version: dir.version,
            meta_members: dir.meta.iter().flat_map(|m| m.replicas.iter()).filter_map(|r| addr(&r.node_id)).collect(),
            nodes: dir
                .nodes
                .values()
                .filter(|n| n.id != self.id && n.state != cleave_metadata::NodeState::Removed)
                .map(|n| n.raft_addr.clone())
                .collect(),
        };
        if next.meta_members.is_empty() {
            next.meta_members = hints.meta_members.clone();
        }
        next.save(&self.settings.data_dir.join("cluster.json"))?;
        *hints = next;
        Ok(())
    }

    /// Records durably that a directory of version `v` exists (a request to
    /// create a replica said it lists the replica), before acting on it.
    pub fn raise_directory_floor(&self, v: u64) -> anyhow::Result<()> {
        let mut hints = self.hints.lock().unwrap();
        if v <= hints.directory_version {
            return Ok(());
        }
        let next = ClusterHints { directory_version: v, ..hints.clone() };
        next.save(&self.settings.data_dir.join("cluster.json"))?;
        *hints = next;
        Ok(())
    }

    pub fn set_leader_hints(&self, leaders: &[(u64, NodeId)]) {
        let mut h = self.leader_hints.write().unwrap();
        h.clear();
        h.extend(leaders.iter().copied());
    }

    pub fn leader_hint(&self, group: u64) -> Option<NodeId> {
        self.leader_hints.read().unwrap().get(&group).copied()
    }

    /// The RPC address of `node`, from the directory.
    pub fn raft_addr_of(&self, node: NodeId) -> Option<String> {
        if node == self.id {
            return Some(self.settings.raft_addr.clone());
        }
        self.directory().nodes.get(&node).map(|n| n.raft_addr.clone())
    }

    /// Where to send a request for `group` that this node cannot serve:
    /// the hinted leader first, then every replica, then the seeds (for the
    /// metadata group before any directory is known).
    pub fn candidates(&self, group: u64) -> Vec<String> {
        let dir = self.directory();
        let mut out = Vec::new();
        if let Some(addr) = self.leader_hint(group).filter(|n| *n != self.id).and_then(|n| self.raft_addr_of(n)) {
            out.push(addr);
        }
        // Committed groups, and a split's new shard before it is committed.
        for r in dir.group_replicas(group).unwrap_or_default() {
            if r.node_id != self.id {
                if let Some(a) = dir.nodes.get(&r.node_id) {
                    out.push(a.raft_addr.clone());
                }
            }
        }
        if group == META_GROUP {
            // Where the metadata group was last seen (persisted), then any
            // node known, then the seeds of the first start.
            let hints = self.hints.lock().unwrap().clone();
            let fallbacks = hints.meta_members.iter().chain(&hints.nodes).chain(&self.seeds);
            out.extend(fallbacks.filter(|s| **s != self.settings.raft_addr).cloned());
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|a| seen.insert(a.clone()));
        out
    }

    /// Sends a node-level request to another node.
    pub async fn call(&self, addr: &str, req: NodeRequest, timeout: Duration) -> Result<rpc::NodeReply, ExecError> {
        match self.ctx.transport.call(addr, Request::Node(req), timeout).await {
            Ok(Response::Node(r)) => r,
            Ok(other) => Err(ExecError::Internal(format!("unexpected reply {other:?}"))),
            Err(rpc::RpcError::Connect { addr, msg }) => Err(ExecError::Unavailable(format!("{addr}: {msg}"))),
            Err(e @ rpc::RpcError::Timeout(_)) => Err(ExecError::Timeout(e.to_string())),
            Err(e) => Err(ExecError::Indeterminate(e.to_string())),
        }
    }

    /// Answers an RPC from another node.
    pub async fn handle_rpc(self: Arc<Self>, req: Request) -> Response {
        match req {
            Request::Raft { group, msg } => match self.group(group) {
                Some(g) => Response::Raft(g.handle_rpc(&self.ctx.snapshot_root, msg).await),
                None => Response::Raft(Err(format!("node {} has no replica of group {group}", self.id))),
            },
            Request::Node(r) => Response::Node(self.handle_node_request(r).await),
        }
    }

    pub async fn handle_node_request(&self, r: NodeRequest) -> Result<rpc::NodeReply, ExecError> {
        use rpc::NodeReply;
        match r {
            NodeRequest::KvWrite { shard, cmd, hops, budget_ms } => {
                let deadline = crate::router::deadline_of(budget_ms, self.settings.write_timeout);
                self.exec_write(shard, cmd, hops, deadline).await.map(NodeReply::Written)
            }
            NodeRequest::KvRead { shard, key, linearizable, hops, budget_ms } => {
                let deadline = crate::router::deadline_of(budget_ms, self.settings.write_timeout);
                self.exec_read(shard, &key, linearizable, hops, deadline).await.map(NodeReply::Read)
            }
            NodeRequest::KvScan { shard, start, end, limit, hops, budget_ms } => {
                let deadline = crate::router::deadline_of(budget_ms, self.settings.write_timeout);
                self.exec_scan(shard, &start, end.as_deref(), limit, hops, deadline).await.map(NodeReply::Scanned)
            }
            NodeRequest::MetaPropose { cmd, hops } => self.propose_meta(cmd, hops).await.map(NodeReply::Meta),
            NodeRequest::Heartbeat { hb, hops } => self.handle_heartbeat(hb, hops).await.map(NodeReply::Heartbeat),
            NodeRequest::ClusterView { hops } => self.cluster_view(hops).await.map(NodeReply::ClusterView),
            NodeRequest::ShardStep { shard, cmd, hops } => {
                self.shard_step(shard, cmd, hops).await.map(NodeReply::Index)
            }
            NodeRequest::CreateGroup { group, replica_id, members, state, campaign, dir_version } => self
                .create_group(group, replica_id, members, state, campaign, dir_version)
                .await
                .map(|_| NodeReply::Done),
            NodeRequest::Genesis { group, hops } => self.genesis(group, hops).await.map(NodeReply::Genesis),
            NodeRequest::Membership { group, change, hops } => {
                self.membership_step(group, change, hops).await.map(NodeReply::Membership)
            }
            NodeRequest::StartMove { shard_id, from_node, to_node, reason, hops } => {
                self.start_move(shard_id, from_node, to_node, reason, hops).await.map(NodeReply::Index)
            }
            NodeRequest::DestroyGroup { group, replica_id } => {
                self.destroy_group(group, replica_id).await.map(|_| NodeReply::Done)
            }
            NodeRequest::IncomingStatus { shard, hops } => self.incoming_status(shard, hops).await,
            NodeRequest::SplitStatus { shard, op_id, hops } => self.split_status(shard, op_id, hops).await,
            NodeRequest::MedianKey { shard, start, end, by_load, hops } => {
                let req =
                    |hops| NodeRequest::MedianKey { shard, start: start.clone(), end: end.clone(), by_load, hops };
                self.median_key(shard, &start, end.as_deref(), by_load, hops, req).await
            }
            NodeRequest::StartSplit { range_id, key, reason, hops } => {
                self.start_split(range_id, key, reason, hops).await.map(NodeReply::Index)
            }
        }
    }

    /// Stops every group cleanly.
    pub async fn shutdown(&self) {
        for g in self.groups() {
            g.shutdown().await;
        }
    }
}
