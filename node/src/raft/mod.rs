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
pub mod membership;
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

/// Live keys and bytes of a shard, kept exact by the state machine and
/// persisted with every apply batch that changes them.
#[derive(Default, Debug)]
pub struct GroupStats {
    keys: AtomicU64,
    bytes: AtomicU64,
}

impl GroupStats {
    pub fn get(&self) -> (u64, u64) {
        (self.keys.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }

    pub fn set(&self, keys: u64, bytes: u64) {
        self.keys.store(keys, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    /// Stored form: keys and bytes, big-endian.
    pub fn encode(keys: u64, bytes: u64) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&keys.to_be_bytes());
        b[8..].copy_from_slice(&bytes.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> (u64, u64) {
        let word = |r: std::ops::Range<usize>| b.get(r).and_then(|s| s.try_into().ok()).map_or(0, u64::from_be_bytes);
        (word(0..8), word(8..16))
    }
}

/// The index of a stored applied log id (the `APPLIED` tag of `group_meta`).
pub fn decode_applied_index(b: &[u8]) -> Option<u64> {
    bincode::serde::decode_from_slice::<openraft::alias::LogIdOf<TypeConfig>, _>(b, bincode::config::standard())
        .ok()
        .map(|(l, _)| l.index)
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
    /// Last log index purged from this replica's log.
    pub purged: Option<u64>,
    /// Voters and learners: replica id → node.
    pub members: BTreeMap<ReplicaId, NodeId>,
}

/// One replica of one group, running.
pub struct GroupRaft {
    pub group: u64,
    pub replica_id: ReplicaId,
    raft: Raft<TypeConfig, GroupSm>,
    pub state: Arc<RwLock<SmState>>,
    pub stats: Arc<GroupStats>,
    /// Client requests served by this replica (as leader, or stale reads).
    pub served: AtomicU64,
    /// A sample of recently requested keys, for load-based split points.
    pub samples: std::sync::Mutex<std::collections::VecDeque<String>>,
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
        let initial = initial.to_json()?;
        batch.put_cf(cf, state_key(group, tag::SM_STATE), &initial);
        batch.put_cf(cf, state_key(group, tag::GENESIS), &initial);
        ctx.db.write(batch)?;
        ctx.syncer.sync().await?;
        Self::open(ctx, desc).await
    }

    /// Deletes every trace of `group` on this node: log, Raft state, data,
    /// state-machine records and snapshot files. The group must be shut down.
    pub fn destroy(ctx: &RaftContext, group: u64) -> anyhow::Result<()> {
        log_store::LogStore::destroy(&ctx.db, group)?;
        let mut batch = rocksdb::WriteBatch::default();
        let (start, end) = (storage::group_prefix(group).to_vec(), storage::group_range_end(group));
        batch.delete_range_cf(storage::cf(&ctx.db, storage::CF_DATA), start.clone(), end.clone());
        batch.delete_range_cf(storage::cf(&ctx.db, CF_GROUP_META), start, end);
        ctx.db.write(batch)?;
        ctx.db.flush_wal(true)?;
        let dir = snapshot::group_dir(&ctx.snapshot_root, group);
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        Ok(())
    }

    /// What is stored for `group` (for error messages): the `group_meta` and
    /// `raft_state` tags present, the log entries and the data keys.
    fn describe(ctx: &RaftContext, group: u64) -> String {
        let count = |name: &str| {
            let cf = storage::cf(&ctx.db, name);
            let mut opts = rocksdb::ReadOptions::default();
            opts.set_iterate_upper_bound(storage::group_range_end(group));
            let from = storage::group_prefix(group);
            let iter =
                ctx.db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward));
            let keys: Vec<Box<[u8]>> = iter.filter_map(|i| i.ok().map(|(k, _)| k)).collect();
            let tags: Vec<u8> = keys.iter().filter(|k| k.len() == 9).map(|k| k[8]).collect();
            (keys.len(), tags)
        };
        let (_, meta_tags) = count(CF_GROUP_META);
        let (_, state_tags) = count(storage::CF_RAFT_STATE);
        let (log, _) = count(storage::CF_RAFT_LOG);
        let (data, _) = count(storage::CF_DATA);
        format!("group_meta tags {meta_tags:?}, raft_state tags {state_tags:?}, {log} log entries, {data} data keys")
    }

    /// The state `group` started from on this node (see `tag::GENESIS`).
    pub fn genesis(ctx: &RaftContext, group: u64) -> anyhow::Result<SmState> {
        let cf = storage::cf(&ctx.db, CF_GROUP_META);
        let raw = ctx
            .db
            .get_cf(cf, state_key(group, tag::GENESIS))?
            .ok_or_else(|| anyhow::anyhow!("group {group} has no recorded genesis state"))?;
        Ok(SmState::from_json(&raw)?)
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
        let (keys, bytes) = ctx.db.get_cf(cf, state_key(group, tag::KEYS))?.map_or((0, 0), |b| GroupStats::decode(&b));
        let stats = Arc::new(GroupStats::default());
        stats.set(keys, bytes);
        let raw = ctx.db.get_cf(cf, state_key(group, tag::SM_STATE))?.ok_or_else(|| {
            anyhow::anyhow!("group {group} has no state-machine state ({})", Self::describe(ctx, group))
        })?;
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
            stats: stats.clone(),
        };
        let net = network::NetworkFactory { group, transport: ctx.transport.clone() };
        let raft = Raft::new(desc.replica_id, Arc::new(config), net, log, sm).await?;
        Ok(GroupRaft {
            group,
            replica_id: desc.replica_id,
            raft,
            state,
            stats,
            served: AtomicU64::new(0),
            samples: Default::default(),
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

    /// Initialises the group from this replica unless a leader reaches it
    /// within `delay`. Initialising makes a replica stand for election at
    /// once, so a new group has exactly one replica do it right away and the
    /// others only as a fallback (when that one is down), to avoid split votes.
    pub fn initialize_later(&self, members: BTreeMap<ReplicaId, ReplicaNode>, delay: std::time::Duration) {
        let raft = self.raft.clone();
        let group = self.group;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if raft.is_initialized().await.unwrap_or(true) {
                return;
            }
            tracing::info!(group, "no leader reached this new replica; initialising the group from here");
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(group, "fallback initialize: {e}");
            }
        });
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
            purged: m.purged.map(|l| l.index),
            members: membership.nodes().map(|(r, n)| (*r, n.node_id)).collect(),
        }
    }

    /// Live keys in this replica's state machine.
    pub fn keys(&self) -> u64 {
        self.stats.get().0
    }

    /// Bytes of live user keys and values held by this replica.
    pub fn size_bytes(&self) -> u64 {
        self.stats.get().1
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
