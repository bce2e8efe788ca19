//! A running node: the parts it is made of, how it starts — bootstrapping
//! a new cluster, rejoining from its data directory, or joining an existing
//! cluster — and where node-to-node requests are dispatched.
//!
//! The parts, each behind its own type:
//! - [`Groups`] (`groups.rs`): the replicas held here and their life cycle.
//! - [`DirectoryCache`] (`directory.rs`): what this node knows of the
//!   cluster's layout (directory, leader hints, persisted hints).
//! - [`Router`](crate::router::Router): getting a request to the replica
//!   that must serve it, and serving it there.
//! - [`MetaLeader`](crate::leader::MetaLeader): the metadata leader's
//!   duties (confirmed leadership, heartbeats, liveness, cluster views).
//! - [`Supervisor`](crate::ops::Supervisor): the operations this node
//!   drives as metadata leader; [`Forwarders`](crate::split::forwarder::Forwarders):
//!   the split forwarders it runs as a source shard's leader;
//!   [`Receiving`](crate::split::receive::Receiving): the backfill files it
//!   receives for split targets.
//!
//! A node's identity (its id and how it was founded) is kept in
//! `node.json` in the data directory, so the same command line restarts it
//! and a restart needs nothing but the directory (`identity.rs`).

mod directory;
mod groups;
mod heartbeat;
mod identity;
pub mod join;
pub mod liveness;
pub mod quiescer;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use cleave_metadata::{Directory, NodeId, META_GROUP};

pub use directory::DirectoryCache;
pub use groups::{unwanted, Groups, FALLBACK_INIT};
pub use heartbeat::heartbeat_loop;
pub use identity::{ClusterHints, Identity, NodeSettings};

use crate::kv::ShardState;
use crate::leader::{LeaderState, MetaLeader};
use crate::ops::Supervisor;
use crate::raft::{GroupRaft, RaftContext, ReplicaNode, SmState};
use crate::router::Router;
use crate::rpc::{self, ExecError, NodeReply, NodeRequest, Request, Response};
use crate::split::forwarder::Forwarders;
use crate::split::receive::Receiving;

/// A running node, shared by the API server, the RPC server and background tasks.
pub struct Node {
    id: NodeId,
    settings: NodeSettings,
    ctx: RaftContext,
    started: Instant,
    groups: Groups,
    cache: DirectoryCache,
    leader: LeaderState,
    supervisor: Supervisor,
    forwarders: Forwarders,
    receiving: Receiving,
    liveness: liveness::Liveness,
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
                Some(addr) => (join::join(&settings, ctx.transport.secret(), addr).await?, false),
                None => bail!("a new node needs --initial-cluster or --join"),
            },
        };
        let cache = DirectoryCache::new(
            identity.node_id,
            settings.raft_addr.clone(),
            identity.seeds.clone(),
            settings.data_dir.join("cluster.json"),
            ctx.addresses.clone(),
        )?;
        let node = Arc::new(Node {
            id: identity.node_id,
            settings: settings.clone(),
            groups: Groups::new(ctx.clone()),
            ctx,
            started: Instant::now(),
            cache,
            leader: LeaderState::default(),
            supervisor: Supervisor::default(),
            forwarders: Forwarders::default(),
            receiving: Receiving::default(),
            liveness: liveness::Liveness::default(),
        });
        // Requests to create or destroy a replica can arrive as soon as the
        // node is published; they wait until every recorded group is open
        // (a destroy racing with the opening of that very group made a
        // restarted node fail to open it, and exit). So the lock is taken
        // before the node is published, never after.
        let lifecycle = node.groups.lock().await;
        let _ = published.set(node.clone());
        node.groups.open_all().await?;
        if fresh && node.groups.is_empty() {
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
            let raft = Arc::new(GroupRaft::create(&self.ctx, g.shard_id, replica, state).await?);
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
                raft.initialize_later(members, FALLBACK_INIT);
            }
            self.groups.insert(raft);
        }
        tracing::info!(node = self.id, "bootstrapped a new cluster");
        Ok(())
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn settings(&self) -> &NodeSettings {
        &self.settings
    }

    /// What every group on the node shares (the database, the transport...).
    pub fn ctx(&self) -> &RaftContext {
        &self.ctx
    }

    /// When this node started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The replicas held here.
    pub fn groups(&self) -> &Groups {
        &self.groups
    }

    /// This node's replica of group `id`, if it holds one in service.
    pub fn group(&self, id: u64) -> Option<Arc<GroupRaft>> {
        self.groups.get(id)
    }

    /// What this node knows of the cluster's layout.
    pub fn dir_cache(&self) -> &DirectoryCache {
        &self.cache
    }

    /// Deletes this node's replica `replica_id` of `group` if, checked under
    /// the lifecycle lock against the newest directory and the directory
    /// floor, the directory no longer wants it (replica GC).
    pub async fn collect_replica(&self, group: u64, replica_id: u64) -> Result<bool, ExecError> {
        self.groups.collect(|| (self.directory(), self.cache.floor()), self.id, group, replica_id).await
    }

    /// The newest directory this node knows: its own metadata replica's, or
    /// the last one the metadata leader sent (installed in the cache).
    pub fn directory(&self) -> Arc<Directory> {
        if let Some(meta) = self.group(META_GROUP) {
            let newer = match &*meta.state.read().unwrap() {
                SmState::Meta(d) if d.version > self.cache.current().version => Some(d.clone()),
                _ => None,
            };
            if let Some(d) = newer {
                self.cache.install(d);
            }
        }
        self.cache.current()
    }

    /// Request routing and serving.
    pub fn router(&self) -> Router<'_> {
        Router::new(self)
    }

    /// The metadata leader's duties.
    pub fn meta_leader(&self) -> MetaLeader<'_> {
        MetaLeader::new(self, &self.leader)
    }

    /// The operations this node drives as metadata leader.
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// The split forwarders this node runs as a source shard's leader.
    pub fn forwarders(&self) -> &Forwarders {
        &self.forwarders
    }

    /// The split backfill files this node is receiving for target replicas.
    pub fn receiving(&self) -> &Receiving {
        &self.receiving
    }

    /// Which peer nodes are up (node-level liveness).
    pub fn liveness(&self) -> &liveness::Liveness {
        &self.liveness
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

    /// Carries out a node-level request here; the reply is the request's own.
    pub async fn handle_node_request(&self, r: NodeRequest) -> Result<NodeReply, ExecError> {
        let deadline = |budget_ms| crate::router::deadline_of(budget_ms, self.settings.write_timeout);
        Ok(match r {
            NodeRequest::KvWrite(rpc::KvWrite { shard, cmd, hops, budget_ms }) => {
                NodeReply::KvWrite(self.router().exec_write(shard, cmd, hops, deadline(budget_ms)).await?)
            }
            NodeRequest::KvRead(rpc::KvRead { shard, key, linearizable, hops, budget_ms }) => {
                NodeReply::KvRead(self.router().exec_read(shard, &key, linearizable, hops, deadline(budget_ms)).await?)
            }
            NodeRequest::KvScan(rpc::KvScan { shard, start, end, limit, hops, budget_ms }) => NodeReply::KvScan(
                self.router().exec_scan(shard, &start, end.as_deref(), limit, hops, deadline(budget_ms)).await?,
            ),
            NodeRequest::MetaPropose(rpc::MetaPropose { cmd, hops }) => {
                NodeReply::MetaPropose(self.router().propose_meta(cmd, hops).await?)
            }
            NodeRequest::Heartbeat(rpc::Heartbeat { hb, hops }) => {
                NodeReply::Heartbeat(self.meta_leader().handle_heartbeat(hb, hops).await?)
            }
            NodeRequest::GetClusterView(rpc::GetClusterView { hops }) => {
                NodeReply::GetClusterView(self.meta_leader().cluster_view(hops).await?)
            }
            NodeRequest::ShardStep(rpc::ShardStep { shard, cmd, at, hops }) => {
                NodeReply::ShardStep(crate::split::steps::shard_step_at(self, shard, cmd, at, hops).await?)
            }
            NodeRequest::CreateGroup(req) => NodeReply::CreateGroup(self.groups.create(&self.cache, req).await?),
            NodeRequest::Genesis(rpc::Genesis { group, hops }) => {
                NodeReply::Genesis(crate::moves::calls::genesis(self, group, hops).await?)
            }
            NodeRequest::Membership(rpc::Membership { group, change, hops }) => {
                NodeReply::Membership(crate::moves::calls::membership_step(self, group, change, hops).await?)
            }
            NodeRequest::StartMove(rpc::StartMove { shard_id, from_node, to_node, reason, hops }) => {
                NodeReply::StartMove(crate::ops::moves::start(self, shard_id, from_node, to_node, reason, hops).await?)
            }
            NodeRequest::DestroyGroup(rpc::DestroyGroup { group, replica_id }) => {
                NodeReply::DestroyGroup(self.groups.destroy(group, replica_id).await?)
            }
            NodeRequest::IncomingStatus(rpc::IncomingStatus { shard, hops }) => {
                NodeReply::IncomingStatus(crate::split::steps::incoming_status(self, shard, hops).await?)
            }
            NodeRequest::SplitStatus(rpc::SplitStatus { shard, op_id, hops }) => {
                NodeReply::SplitStatus(crate::split::forwarder::status(self, shard, op_id, hops).await?)
            }
            NodeRequest::MedianKey(req) => NodeReply::MedianKey(crate::split::steps::median_key(self, req).await?),
            NodeRequest::Ping(rpc::Ping { .. }) => NodeReply::Ping(rpc::Pong { failed: self.groups.failed() }),
            NodeRequest::DeclareKeyspace(rpc::DeclareKeyspace { prefix, buckets, hops }) => {
                NodeReply::DeclareKeyspace(crate::keyspace::declare(self, prefix, buckets, hops).await?)
            }
            NodeRequest::StartMerge(rpc::StartMerge { range_id, reason, hops }) => {
                NodeReply::StartMerge(crate::ops::merge::start(self, range_id, reason, hops).await?)
            }
            NodeRequest::StartSplit(rpc::StartSplit { range_id, key, reason, hops }) => {
                NodeReply::StartSplit(crate::ops::split::start(self, range_id, key, reason, hops).await?)
            }
            NodeRequest::SplitChunk(rpc::SplitChunk { chunk }) => {
                NodeReply::SplitChunk(crate::split::forwarder::receive_chunk(self, chunk).await?)
            }
            NodeRequest::TxnStep(rpc::TxnStep { shard, cmd, at, hops, budget_ms }) => {
                NodeReply::TxnStep(self.router().exec_txn_at(shard, cmd, at, hops, deadline(budget_ms)).await?)
            }
            NodeRequest::MirrorStatus(rpc::MirrorStatus { spec }) => {
                let (db, root) = (self.ctx().db.clone(), self.ctx().snapshot_root.clone());
                let mirrors = self.ctx().mirrors.clone();
                let report = tokio::task::spawn_blocking(move || mirrors.report(&db, &root, &spec))
                    .await
                    .map_err(|e| ExecError::Internal(e.to_string()))?
                    .map_err(|e| ExecError::Internal(e.to_string()))?;
                NodeReply::MirrorStatus(report)
            }
            NodeRequest::WatchChanges(rpc::WatchChanges { shard, req }) => {
                let g = self.group(shard).ok_or(ExecError::Unavailable(format!("no replica of shard {shard} here")))?;
                NodeReply::WatchChanges(crate::watch::serve::changes_since(&self.ctx().db, &g, &req).await?)
            }
        })
    }

    /// Stops every group cleanly.
    pub async fn shutdown(&self) {
        self.groups.shutdown().await;
    }
}
