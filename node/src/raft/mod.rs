//! Our wrapper around openraft: the only module that names the `openraft`
//! crate, so an upgrade of the pinned version touches this folder alone.
//!
//! A node hosts many groups (multi-raft). Each [`GroupRaft`] is one replica of
//! one group: an openraft `Raft` over a [`log_store::LogStore`] and a
//! [`state_machine::GroupSm`], both on the node's shared RocksDB, talking to
//! its peers through [`network`] over the node's RPC transport. The rest of
//! the node sees only our own types: [`WriteError`], [`ReadError`],
//! [`GroupStatus`].

pub mod log_store;
pub mod network;
pub mod snapshot;
pub mod state_machine;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use cleave_metadata::{Directory, NodeId, ReplicaId};
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::{Config, Raft, ReadPolicy, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResponse};
use crate::kv::ShardState;
use crate::rpc::Transport;
use crate::storage::{self, io_err, state_key, tag, Db, Syncer, CF_GROUP_META};
use state_machine::GroupSm;

/// The openraft member information: which node hosts a replica and where
/// that node's RPC port is.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaNode {
    pub node_id: NodeId,
    pub raft_addr: String,
}

openraft::declare_raft_types!(
    /// Types used by every CleaveDB Raft group.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = u64,
        Node = ReplicaNode,
);

/// The replicated, non-data state of a group's state machine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum SmState {
    /// The metadata group holds the directory.
    Meta(Directory),
    /// A shard holds the ranges it owns (its data is in the `data` family).
    Shard(ShardState),
}

impl SmState {
    pub fn to_json(&self) -> std::io::Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(io_err)
    }

    pub fn from_json(b: &[u8]) -> std::io::Result<SmState> {
        serde_json::from_slice(b).map_err(io_err)
    }
}

/// Timing and log-retention knobs shared by every group on a node.
#[derive(Clone, Debug)]
pub struct RaftSettings {
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    /// Build a snapshot after this many applied entries.
    pub snapshot_logs: u64,
    /// Entries kept behind a snapshot for slow followers.
    pub keep_logs: u64,
}

/// What every group on the node shares.
#[derive(Clone)]
pub struct RaftContext {
    pub db: Arc<Db>,
    pub syncer: Syncer,
    pub transport: Transport,
    pub snapshot_root: PathBuf,
    pub settings: RaftSettings,
}

/// The on-disk record that a group exists on this node.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct GroupDescriptor {
    pub group: u64,
    pub replica_id: ReplicaId,
}

/// Why a write was not applied.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("not the leader")]
    NotLeader { leader: Option<ReplicaNode> },
    /// The entry may or may not have been committed (leader changed).
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    #[error("raft failure: {0}")]
    Fatal(String),
}

/// Why a linearizable read could not be served here.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("not the leader")]
    NotLeader { leader: Option<ReplicaNode> },
    #[error("no quorum: {0}")]
    NoQuorum(String),
    #[error("raft failure: {0}")]
    Fatal(String),
}

/// A snapshot of a replica's Raft status.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: u64,
    pub replica_id: ReplicaId,
    pub is_leader: bool,
    pub leader: Option<ReplicaNode>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub committed: Option<u64>,
    pub applied: Option<u64>,
    /// Voters and learners: replica id → node.
    pub members: BTreeMap<ReplicaId, NodeId>,
}

/// One replica of one group, running.
pub struct GroupRaft {
    pub group: u64,
    pub replica_id: ReplicaId,
    raft: Raft<TypeConfig, GroupSm>,
    pub state: Arc<RwLock<SmState>>,
    keys: Arc<AtomicU64>,
    /// Client requests served by this replica (as leader, or stale reads).
    pub served: AtomicU64,
    db: Arc<Db>,
}

impl GroupRaft {
    /// Records a new group on this node with its initial state, then opens it.
    pub async fn create(
        ctx: &RaftContext,
        group: u64,
        replica_id: ReplicaId,
        initial: SmState,
    ) -> anyhow::Result<GroupRaft> {
        let cf = storage::cf(&ctx.db, CF_GROUP_META);
        let mut batch = rocksdb::WriteBatch::default();
        let desc = GroupDescriptor { group, replica_id };
        batch.put_cf(cf, state_key(group, tag::DESCRIPTOR), serde_json::to_vec(&desc)?);
        batch.put_cf(cf, state_key(group, tag::SM_STATE), initial.to_json()?);
        ctx.db.write(batch)?;
        ctx.syncer.sync().await?;
        Self::open(ctx, desc).await
    }

    /// Every group recorded on this node.
    pub fn list(db: &Db) -> anyhow::Result<Vec<GroupDescriptor>> {
        let cf = storage::cf(db, CF_GROUP_META);
        let mut out = Vec::new();
        for item in db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            if k.len() == 9 && k[8] == tag::DESCRIPTOR {
                out.push(serde_json::from_slice(&v)?);
            }
        }
        Ok(out)
    }

    /// Opens a group recorded on this node.
    pub async fn open(ctx: &RaftContext, desc: GroupDescriptor) -> anyhow::Result<GroupRaft> {
        let group = desc.group;
        snapshot::recover_install(&ctx.db, &ctx.snapshot_root, group)?;
        snapshot::remove_partial(&ctx.snapshot_root, group);
        let cf = storage::cf(&ctx.db, CF_GROUP_META);
        let keys = ctx
            .db
            .get_cf(cf, state_key(group, tag::KEYS))?
            .and_then(|b| b.as_slice().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        let keys = Arc::new(AtomicU64::new(keys));
        let raw = ctx
            .db
            .get_cf(cf, state_key(group, tag::SM_STATE))?
            .ok_or_else(|| anyhow::anyhow!("group {group} has no state-machine state"))?;
        let state = Arc::new(RwLock::new(SmState::from_json(&raw)?));
        let s = &ctx.settings;
        let config = Config {
            cluster_name: format!("cleave-g{group}"),
            heartbeat_interval: s.heartbeat_ms,
            election_timeout_min: s.election_timeout_ms,
            election_timeout_max: s.election_timeout_ms * 2,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(s.snapshot_logs),
            max_in_snapshot_log_to_keep: s.keep_logs,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        }
        .validate()?;
        let log = log_store::LogStore::new(ctx.db.clone(), group, ctx.syncer.clone());
        let sm = GroupSm {
            db: ctx.db.clone(),
            group,
            state: state.clone(),
            snapshot_root: ctx.snapshot_root.clone(),
            keys: keys.clone(),
        };
        let net = network::NetworkFactory { group, transport: ctx.transport.clone() };
        let raft = Raft::new(desc.replica_id, Arc::new(config), net, log, sm).await?;
        Ok(GroupRaft {
            group,
            replica_id: desc.replica_id,
            raft,
            state,
            keys,
            served: AtomicU64::new(0),
            db: ctx.db.clone(),
        })
    }

    /// Makes `members` the group's first membership. Harmless (and ignored)
    /// when the group was already initialised here or elsewhere.
    pub async fn initialize(&self, members: BTreeMap<ReplicaId, ReplicaNode>) -> anyhow::Result<()> {
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(e)) => {
                tracing::debug!(group = self.group, "initialize: {e}");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Proposes `cmd` and waits until it is applied here.
    pub async fn write(&self, cmd: Command) -> Result<CommandResponse, WriteError> {
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(WriteError::NotLeader { leader: f.leader_node })
            }
            Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(f))) => {
                Err(WriteError::Indeterminate(f.to_string()))
            }
            Err(e) => Err(WriteError::Fatal(e.to_string())),
        }
    }

    /// Returns once this replica, as leader, has confirmed with a quorum that
    /// it still leads and has applied everything committed before the call.
    pub async fn read_barrier(&self) -> Result<(), ReadError> {
        match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
                Err(ReadError::NotLeader { leader: f.leader_node })
            }
            Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(q))) => {
                Err(ReadError::NoQuorum(q.to_string()))
            }
            Err(e) => Err(ReadError::Fatal(e.to_string())),
        }
    }

    /// The current Raft status of this replica.
    pub fn status(&self) -> GroupStatus {
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let leader = m.current_leader.and_then(|l| membership.get_node(&l).cloned());
        GroupStatus {
            group: self.group,
            replica_id: self.replica_id,
            is_leader: m.state == ServerState::Leader,
            leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            committed: m.cluster_committed.map(|l| l.index),
            applied: m.last_applied.map(|l| l.index),
            members: membership.nodes().map(|(r, n)| (*r, n.node_id)).collect(),
        }
    }

    /// Live keys in this replica's state machine.
    pub fn keys(&self) -> u64 {
        self.keys.load(Ordering::Relaxed)
    }

    /// Approximate bytes of user data held by this replica.
    pub fn size_bytes(&self) -> u64 {
        let cf = storage::cf(&self.db, storage::CF_DATA);
        let start = storage::group_prefix(self.group);
        let end = storage::group_range_end(self.group);
        let sizes = self.db.get_approximate_sizes_cf(cf, &[rocksdb::Range::new(&start, &end)]);
        sizes.first().copied().unwrap_or(0)
    }

    /// Handles a Raft message from a peer replica.
    pub async fn handle_rpc(
        &self,
        root: &std::path::Path,
        msg: network::RaftRpc,
    ) -> Result<network::RaftReply, String> {
        network::handle(self, root, msg).await
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(group = self.group, "shutdown: {e}");
        }
    }
}
