//! Our wrapper around openraft: the only module that names the `openraft`
//! crate, so an upgrade of the pinned version touches this folder alone.
//!
//! A node hosts many groups (multi-raft). Each [`GroupRaft`] is one replica of
//! one group: an openraft `Raft` over a [`log_store::LogStore`] and a
//! [`state_machine::GroupSm`], both on the node's shared RocksDB, talking to
//! its peers through [`network`] over the node's RPC transport. The rest of
//! the node sees only our own types: [`WriteError`], [`ReadError`],
//! [`GroupStatus`].

pub mod directory_store;
pub mod incarnation;
pub mod instance;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod quiesce;
pub mod snapshot;
pub mod state_machine;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use cleave_metadata::{Directory, NodeId, ReplicaId};
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

    /// The form stored under `tag::SM_STATE`: a shard's whole state, the
    /// metadata group's directory header (see [`directory_store`]). The
    /// header is tagged `MetaHeader`, not `Meta`, so that a binary from
    /// before this layout fails to read it and stops, rather than take the
    /// header for a directory with no shards and serve from it.
    pub fn stored_json(&self) -> std::io::Result<Vec<u8>> {
        match self {
            SmState::Meta(d) => serde_json::to_vec(&StoredRef::MetaHeader(&directory_store::header(d))),
            SmState::Shard(s) => serde_json::to_vec(&StoredRef::Shard(s)),
        }
        .map_err(io_err)
    }

    /// The state of `group` whose stored form (`tag::SM_STATE`) is `raw`:
    /// a shard's as it is, the metadata group's joined with its directory
    /// records. A whole directory (stored before this layout) is rewritten
    /// in it first.
    pub fn read(db: &Db, group: u64, raw: &[u8]) -> std::io::Result<SmState> {
        Ok(match serde_json::from_slice::<Stored>(raw).map_err(io_err)? {
            Stored::MetaHeader(h) => SmState::Meta(directory_store::load(db, group, h)?),
            Stored::Meta(d) => SmState::Meta(directory_store::load_or_migrate(db, group, d)?),
            Stored::Shard(s) => SmState::Shard(s),
        })
    }
}

/// [`SmState`] as stored under `tag::SM_STATE` (see [`SmState::stored_json`]).
#[derive(Serialize)]
enum StoredRef<'a> {
    MetaHeader(&'a Directory),
    Shard(&'a ShardState),
}

/// [`StoredRef`] as read back; `Meta` is a whole directory, as stored
/// before the record layout (or a header written by the first version of
/// it, which had no tag of its own).
#[derive(Deserialize)]
enum Stored {
    Meta(Directory),
    MetaHeader(Directory),
    Shard(ShardState),
}

/// The directory header in a stored `tag::SM_STATE` (tests).
#[cfg(test)]
pub(crate) fn stored_header(raw: &[u8]) -> Option<Directory> {
    match serde_json::from_slice::<Stored>(raw).ok()? {
        Stored::MetaHeader(h) => Some(h),
        _ => None,
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
    /// A quiet replica idle this long drops its openraft instance (0:
    /// never; see [`instance`]).
    pub dormant_after_ms: u64,
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
    crate::codec::decode::<openraft::alias::LogIdOf<TypeConfig>>(b).ok().map(|l| l.index)
}

/// The current RPC address of every node, from the newest directory this
/// node knows. Raft messages go to a replica's node by its id through this
/// book, so a node that comes back on another address is reached at once,
/// without a membership change in every group it holds.
#[derive(Clone, Default)]
pub struct AddressBook(Arc<RwLock<std::collections::HashMap<NodeId, String>>>);

impl AddressBook {
    pub fn get(&self, node: NodeId) -> Option<String> {
        self.0.read().unwrap().get(&node).cloned()
    }

    /// Replaces the book with the addresses of `dir`.
    pub fn update(&self, dir: &Directory) {
        let mut book = self.0.write().unwrap();
        book.clear();
        book.extend(dir.nodes.values().map(|n| (n.id, n.raft_addr.clone())));
    }
}

/// What every group on the node shares.
#[derive(Clone)]
pub struct RaftContext {
    pub addresses: AddressBook,
    pub db: Arc<Db>,
    pub syncer: Syncer,
    pub transport: Transport,
    pub snapshot_root: PathBuf,
    pub settings: RaftSettings,
    /// The groups whose replica here may be awake.
    pub awake: Arc<quiesce::AwakeSet>,
    /// Split targets filled beside their source on this node.
    pub mirrors: Arc<crate::split::mirror::Mirrors>,
    /// The node's hybrid logical clock: stamps proposals, and every
    /// shard's apply moves it past the timestamps it gives (`watch`).
    pub clock: Arc<crate::clock::Clock>,
}

/// Removes `group`'s snapshot folder, if any.
fn remove_snapshot_dir(ctx: &RaftContext, group: u64) -> std::io::Result<()> {
    match std::fs::remove_dir_all(snapshot::group_dir(&ctx.snapshot_root, group)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
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
    /// The openraft instance, live or dormant (see [`instance`]).
    instance: Arc<instance::InstanceSlot>,
    /// What reopening a dormant instance needs.
    ctx: RaftContext,
    config: Arc<Config>,
    pub state: Arc<RwLock<SmState>>,
    pub stats: Arc<GroupStats>,
    /// A snapshot install is replacing the data (read under `state`'s lock).
    installing: Arc<AtomicBool>,
    /// A storage error stopped this replica (set by its state machine).
    failed: Arc<AtomicBool>,
    /// Client requests served by this replica (as leader, or stale reads).
    pub served: AtomicU64,
    /// A sample of recently requested keys, for load-based split points.
    pub samples: std::sync::Mutex<std::collections::VecDeque<String>>,
    /// Whether the replica is quiet (see [`quiesce`]).
    quiescence: Arc<quiesce::Quiescence>,
    /// The replica's resolved timestamp as of its applied state (`watch`),
    /// sent anew after every apply batch: what a watch waits on.
    pub resolved: Arc<tokio::sync::watch::Sender<crate::clock::Ts>>,
}

/// The parts of a [`GroupRaft`] that starting its openraft instance needs.
struct Opener {
    ctx: RaftContext,
    group: u64,
    replica_id: ReplicaId,
    config: Arc<Config>,
    state: Arc<RwLock<SmState>>,
    stats: Arc<GroupStats>,
    installing: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    quiescence: Arc<quiesce::Quiescence>,
    resolved: Arc<tokio::sync::watch::Sender<crate::clock::Ts>>,
}

impl Opener {
    /// Starts an instance over the replica's storage and in-memory state (at
    /// open, and when a dormant replica wakes). A storage error stops the
    /// replica (see `GroupSm::fail`).
    async fn start(self) -> Result<instance::Instance, instance::Unavailable> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(instance::Unavailable::Stopped);
        }
        let (group, failed, quiescence) = (self.group, self.failed.clone(), self.quiescence.clone());
        match self.start_instance().await {
            Ok(i) => {
                quiescence.reopened();
                Ok(i)
            }
            Err(e) => {
                tracing::error!(group, "starting the replica's Raft instance: {e:#}");
                failed.store(true, Ordering::SeqCst);
                Err(instance::Unavailable::Reopen(e.to_string()))
            }
        }
    }

    async fn start_instance(self) -> anyhow::Result<instance::Instance> {
        let ctx = &self.ctx;
        // An install the previous instance was running when it ended is
        // finished first, and the state it left is what the replica holds.
        let (db, root, group) = (ctx.db.clone(), ctx.snapshot_root.clone(), self.group);
        let mirrors = ctx.mirrors.clone();
        let redone = tokio::task::spawn_blocking(move || {
            mirrors.reset_if_interrupted(&db, group)?;
            let redone = snapshot::recover_install(&db, &root, group)?;
            mirrors.installed(group);
            Ok::<_, std::io::Error>(redone)
        })
        .await??;
        if redone || self.installing.load(Ordering::SeqCst) {
            let (sm_state, (keys, bytes)) = GroupRaft::load_state(ctx, group)?;
            let mut state = self.state.write().map_err(|_| anyhow::anyhow!("state lock poisoned"))?;
            self.stats.set(keys, bytes);
            *state = sm_state;
            self.installing.store(false, Ordering::SeqCst);
        }
        let incarnation = Arc::new(incarnation::Incarnation::default());
        let log = log_store::LogStore::new(ctx.db.clone(), group, ctx.syncer.clone(), incarnation.clone());
        let sm = GroupSm {
            db: ctx.db.clone(),
            group,
            state: self.state,
            snapshot_root: ctx.snapshot_root.clone(),
            stats: self.stats,
            incarnation: incarnation.clone(),
            installing: self.installing,
            failed: self.failed,
            mirrors: ctx.mirrors.clone(),
            clock: ctx.clock.clone(),
            resolved: self.resolved,
        };
        let net = network::NetworkFactory { group, transport: ctx.transport.clone(), addresses: ctx.addresses.clone() };
        let raft = Raft::new(self.replica_id, self.config, net, log, sm).await?;
        Ok(instance::Instance { raft, incarnation })
    }
}

impl GroupRaft {
    /// Records a new group on this node with its initial state, then opens it.
    /// Snapshot files a destroyed earlier replica of the group may have left
    /// (see [`GroupRaft::destroy`]) are removed first.
    pub async fn create(
        ctx: &RaftContext,
        group: u64,
        replica_id: ReplicaId,
        initial: SmState,
    ) -> anyhow::Result<GroupRaft> {
        remove_snapshot_dir(ctx, group)?;
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

    /// Deletes every trace of `group` on this node — log, Raft state, data,
    /// state-machine records — in one synced batch that also records
    /// `replica_id` as the group's tombstone, then its snapshot files. The
    /// replica must be shut down (its incarnation ended). A crash after the
    /// batch leaves only snapshot files of a group the node no longer lists:
    /// harmless, since [`GroupRaft::create`] and start-up remove them.
    pub fn destroy(ctx: &RaftContext, group: u64, replica_id: ReplicaId) -> anyhow::Result<()> {
        // A copy filling this replica beside its split source stops first.
        ctx.mirrors.forget(group);
        let mut batch = rocksdb::WriteBatch::default();
        let (start, end) = (storage::group_prefix(group).to_vec(), storage::group_range_end(group));
        for name in storage::ALL_CFS {
            batch.delete_range_cf(storage::cf(&ctx.db, name), start.clone(), end.clone());
        }
        let tombstone = Self::tombstone(ctx, group)?.max(replica_id);
        batch.put_cf(storage::cf(&ctx.db, CF_GROUP_META), state_key(group, tag::TOMBSTONE), tombstone.to_be_bytes());
        ctx.db.write(batch)?;
        ctx.db.flush_wal(true)?;
        remove_snapshot_dir(ctx, group)?;
        Ok(())
    }

    /// The newest replica id of `group` deleted from this node (0: none).
    pub fn tombstone(ctx: &RaftContext, group: u64) -> anyhow::Result<ReplicaId> {
        let cf = storage::cf(&ctx.db, CF_GROUP_META);
        Ok(ctx
            .db
            .get_pinned_cf(cf, state_key(group, tag::TOMBSTONE))?
            .and_then(|b| b.as_ref().try_into().ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Removes the snapshot folders of groups this node does not hold (left
    /// by a crash in the middle of [`GroupRaft::destroy`]), and the split
    /// backfill files a source was shipping when it stopped (a new
    /// forwarder writes its own).
    pub fn remove_orphan_snapshots(ctx: &RaftContext, held: &[GroupDescriptor]) -> anyhow::Result<()> {
        crate::split::sst::remove_dir(&crate::split::sst::outbox_root(&ctx.snapshot_root))?;
        crate::split::mirror::remove_leftovers(&ctx.snapshot_root)?;
        let Ok(entries) = std::fs::read_dir(&ctx.snapshot_root) else { return Ok(()) };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(group) = name.to_str().and_then(|n| n.strip_prefix('g')).and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if !held.iter().any(|d| d.group == group) {
                tracing::info!(group, "removing snapshot files of a group this node no longer holds");
                remove_snapshot_dir(ctx, group)?;
            }
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

    /// The state-machine state and the stats stored for `group`.
    fn load_state(ctx: &RaftContext, group: u64) -> anyhow::Result<(SmState, (u64, u64))> {
        let cf = storage::cf(&ctx.db, CF_GROUP_META);
        let stats = ctx.db.get_cf(cf, state_key(group, tag::KEYS))?.map_or((0, 0), |b| GroupStats::decode(&b));
        let raw = ctx.db.get_cf(cf, state_key(group, tag::SM_STATE))?.ok_or_else(|| {
            anyhow::anyhow!("group {group} has no state-machine state ({})", Self::describe(ctx, group))
        })?;
        Ok((SmState::read(&ctx.db, group, &raw)?, stats))
    }

    /// Opens a group recorded on this node.
    pub async fn open(ctx: &RaftContext, desc: GroupDescriptor) -> anyhow::Result<GroupRaft> {
        let group = desc.group;
        // An install a crash interrupted is redone first: it rewrites the
        // stats and the state read below.
        ctx.mirrors.reset_if_interrupted(&ctx.db, group)?;
        snapshot::recover_install(&ctx.db, &ctx.snapshot_root, group)?;
        ctx.mirrors.installed(group);
        snapshot::remove_partial(&ctx.snapshot_root, group);
        let (sm_state, (keys, bytes)) = Self::load_state(ctx, group)?;
        let stats = Arc::new(GroupStats::default());
        stats.set(keys, bytes);
        let resolved = match &sm_state {
            SmState::Shard(s) => s.resolved(),
            SmState::Meta(_) => 0,
        };
        let state = Arc::new(RwLock::new(sm_state));
        let s = &ctx.settings;
        let config = Config {
            cluster_name: format!("cleave-g{group}"),
            heartbeat_interval: s.heartbeat_ms,
            election_timeout_min: s.election_timeout_ms,
            election_timeout_max: s.election_timeout_ms * 2,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(s.snapshot_logs),
            max_in_snapshot_log_to_keep: s.keep_logs,
            install_snapshot_timeout: 10_000,
            // Replicas open quiet (see `quiesce`): a restarted node must not
            // start an election in every group whose leader is quiet. The
            // metadata group is always awake.
            enable_tick: group == cleave_metadata::META_GROUP,
            // An awake replica cut off from its leader asks before it bumps
            // the term, so it does not depose a healthy quiet leader.
            enable_pre_vote: Some(true),
            log_stage_capacity: Some(1),
            ..Default::default()
        }
        .validate()?;
        let g = GroupRaft {
            group,
            replica_id: desc.replica_id,
            instance: instance::InstanceSlot::unopened(desc.replica_id),
            ctx: ctx.clone(),
            config: Arc::new(config),
            state,
            stats,
            installing: Arc::new(AtomicBool::new(false)),
            failed: Arc::new(AtomicBool::new(false)),
            served: AtomicU64::new(0),
            samples: Default::default(),
            quiescence: Arc::new(quiesce::Quiescence::new(
                group == cleave_metadata::META_GROUP,
                ctx.awake.clone(),
                group,
            )),
            resolved: Arc::new(tokio::sync::watch::Sender::new(resolved)),
        };
        g.live().await?;
        Ok(g)
    }

    /// What starting this replica's openraft instance needs, owned: a
    /// reopen runs in a task of its own (see [`instance`]).
    fn opener(&self) -> Opener {
        Opener {
            ctx: self.ctx.clone(),
            group: self.group,
            replica_id: self.replica_id,
            config: self.config.clone(),
            state: self.state.clone(),
            stats: self.stats.clone(),
            installing: self.installing.clone(),
            failed: self.failed.clone(),
            quiescence: self.quiescence.clone(),
            resolved: self.resolved.clone(),
        }
    }

    /// The replica's live openraft instance, reopened if it was dormant.
    async fn live(&self) -> Result<Arc<instance::Instance>, instance::Unavailable> {
        // The opener is built only for a reopen (it clones a dozen handles).
        self.instance.get(|| self.opener().start()).await
    }

    /// Runs `f` on this replica's Raft metrics (the live instance's, or the
    /// last ones of a dormant or stopped replica).
    fn with_metrics<R>(&self, f: impl FnOnce(&instance::Metrics) -> R) -> R {
        self.instance.with_metrics(f)
    }

    /// Whether the replica has dropped its openraft instance (see [`instance`]).
    pub fn is_dormant(&self) -> bool {
        self.instance.is_dormant()
    }

    /// Whether the replica was stopped for good (its data may be deleted
    /// from then on: a move's source, replica GC).
    pub fn is_stopped(&self) -> bool {
        self.instance.is_stopped()
    }

    /// Makes `members` the group's first membership. Harmless (and ignored)
    /// when the group was already initialised here or elsewhere.
    pub async fn initialize(&self, members: BTreeMap<ReplicaId, ReplicaNode>) -> anyhow::Result<()> {
        let i = self.live().await?;
        self.quiescence.force_wake(&i.raft);
        match i.raft.initialize(members).await {
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
    pub fn initialize_later(self: &Arc<Self>, members: BTreeMap<ReplicaId, ReplicaNode>, delay: std::time::Duration) {
        let g = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let Ok(i) = g.live().await else { return };
            if i.raft.is_initialized().await.unwrap_or(true) {
                return;
            }
            tracing::info!(group = g.group, "no leader reached this new replica; initialising the group from here");
            g.quiescence.force_wake(&i.raft);
            if let Err(e) = i.raft.initialize(members).await {
                tracing::debug!(group = g.group, "fallback initialize: {e}");
            }
        });
    }

    /// Proposes `cmd` and waits until it is applied here. The entry is
    /// stamped with this node's clock unless its proposer stamped it
    /// already ([`Command::At`]: a floor it needs the entry's timestamp to
    /// reach, e.g. a transaction's commit timestamp).
    pub async fn write(&self, cmd: Command) -> Result<CommandResponse, WriteError> {
        let cmd = match cmd {
            Command::At { ts, cmd } => {
                self.ctx.clock.observe(ts);
                Command::At { ts, cmd }
            }
            cmd => Command::At { ts: self.ctx.clock.now(), cmd: Box::new(cmd) },
        };
        let i = self.live().await.map_err(|e| WriteError::Fatal(e.to_string()))?;
        self.wake_for_write(&i.raft).await;
        match i.raft.client_write(cmd).await {
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
        // A read-index round needs no lease: it runs its own quorum round.
        let i = self.live().await.map_err(|e| ReadError::Fatal(e.to_string()))?;
        self.wake(&i.raft);
        match i.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
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
        self.with_metrics(|m| {
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
        })
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

    /// Stops the replica. Once this returns, none of its tasks writes to
    /// storage any more (openraft joins only its core task; the state-machine
    /// worker and snapshot builder are fenced by the incarnation), so its
    /// data may be deleted or replaced.
    pub async fn shutdown(&self) {
        self.instance.stop().await;
    }

    /// Whether a storage error stopped this replica: it is out of service.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Marks an install in progress, as `install_snapshot` does (tests).
    #[cfg(test)]
    pub(crate) fn set_installing(&self, on: bool) {
        let _state = self.state.write().unwrap();
        self.installing.store(on, Ordering::SeqCst);
    }

    /// Whether a snapshot install is replacing this replica's data. Read it
    /// under the state lock: the install sets and clears it under that lock.
    pub fn is_installing(&self) -> bool {
        self.installing.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{log_key, ALL_CFS, CF_DATA, CF_RAFT_LOG, CF_RAFT_STATE};
    use crate::testing::temp_ctx;

    /// Every key stored for `group`, per column family.
    fn stored(ctx: &RaftContext, group: u64) -> Vec<(&'static str, Vec<u8>)> {
        let mut out = Vec::new();
        for name in ALL_CFS {
            let mut opts = rocksdb::ReadOptions::default();
            opts.set_iterate_upper_bound(storage::group_range_end(group));
            let from = storage::group_prefix(group);
            let cf = storage::cf(&ctx.db, name);
            for item in
                ctx.db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward))
            {
                out.push((name, item.unwrap().0.to_vec()));
            }
        }
        out
    }

    #[tokio::test]
    async fn destroy_deletes_every_record_and_file_and_leaves_a_tombstone() {
        let (_d, ctx) = temp_ctx();
        let g = GroupRaft::create(&ctx, 7, 3, SmState::Shard(crate::testing::whole_shard())).await.unwrap();
        let neighbour = GroupRaft::create(&ctx, 8, 4, SmState::Shard(Default::default())).await.unwrap();
        ctx.db.put_cf(storage::cf(&ctx.db, CF_RAFT_LOG), log_key(7, 1), b"entry").unwrap();
        ctx.db.put_cf(storage::cf(&ctx.db, CF_RAFT_STATE), state_key(7, tag::VOTE), b"vote").unwrap();
        ctx.db.put_cf(storage::cf(&ctx.db, CF_DATA), storage::data_key(7, b"k"), b"v").unwrap();
        let snap_dir = snapshot::group_dir(&ctx.snapshot_root, 7);
        std::fs::create_dir_all(&snap_dir).unwrap();
        std::fs::write(snap_dir.join("snap-1-1.snap"), b"x").unwrap();
        let before_neighbour = stored(&ctx, 8);
        g.shutdown().await;
        GroupRaft::destroy(&ctx, 7, 3).unwrap();
        let tombstone = (CF_GROUP_META, state_key(7, tag::TOMBSTONE).to_vec());
        assert_eq!(stored(&ctx, 7), vec![tombstone], "only the tombstone is left");
        assert_eq!(GroupRaft::tombstone(&ctx, 7).unwrap(), 3);
        assert!(!snap_dir.exists());
        assert!(GroupRaft::list(&ctx.db).unwrap().iter().all(|d| d.group != 7));
        assert_eq!(stored(&ctx, 8), before_neighbour, "other groups untouched");
        neighbour.shutdown().await;
    }

    #[tokio::test]
    async fn snapshot_files_left_by_a_crash_in_destroy_are_removed() {
        let (_d, ctx) = temp_ctx();
        // A crash after destroy's batch left group 7's snapshot folder.
        let leftover = snapshot::group_dir(&ctx.snapshot_root, 7);
        std::fs::create_dir_all(&leftover).unwrap();
        std::fs::write(leftover.join("snap-00000000000000000009-1.snap"), b"stale").unwrap();
        GroupRaft::remove_orphan_snapshots(&ctx, &GroupRaft::list(&ctx.db).unwrap()).unwrap();
        assert!(!leftover.exists(), "removed at start-up");
        // ... and by a new replica of the group, should one be created first.
        std::fs::create_dir_all(&leftover).unwrap();
        std::fs::write(leftover.join("snap-00000000000000000009-1.snap"), b"stale").unwrap();
        let g = GroupRaft::create(&ctx, 7, 5, SmState::Shard(Default::default())).await.unwrap();
        assert!(snapshot::latest(&ctx.snapshot_root, 7).unwrap().is_none());
        g.shutdown().await;
    }

    /// Polls `f` every 20 ms until it holds; panics after `secs`.
    async fn until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn an_idle_quiet_replica_drops_its_instance_and_reopens_on_first_use() {
        use crate::command::{KvCommand, KvOp};
        let (_d, mut ctx) = temp_ctx();
        ctx.settings.dormant_after_ms = 1;
        let g = GroupRaft::create(&ctx, 7, 3, SmState::Shard(crate::testing::whole_shard())).await.unwrap();
        let me = ReplicaNode { node_id: 1, raft_addr: "127.0.0.1:9".into() };
        g.initialize(BTreeMap::from([(3, me)])).await.unwrap();
        until(10, "leadership", || g.status().is_leader).await;
        let put = |v: &str| {
            Command::Kv(KvCommand {
                range_id: 1,
                epoch: 1,
                op: KvOp::Put { key: "k".into(), value: v.into(), if_version: None },
            })
        };
        g.write(put("1")).await.unwrap();
        assert!(!g.hibernate().await, "an awake replica keeps its instance");
        // A single voter has no one to ask: it goes quiet once idle.
        until(10, "quiescence", || {
            if let Some(p) = g.propose_quiescence(|_| true) {
                g.complete_quiescence(&p, true);
            }
            g.is_quiet()
        })
        .await;
        let before = g.status();
        assert!(g.hibernate().await, "quiet, idle and settled: dormant");
        assert!(g.is_dormant() && g.instance.live().is_none());
        let frozen = g.status();
        assert_eq!(
            (frozen.is_leader, frozen.term, frozen.applied, frozen.members.clone()),
            (before.is_leader, before.term, before.applied, before.members.clone()),
            "a dormant replica reports what it last was"
        );
        assert!(!g.hibernate().await, "dormant once");
        // The next write reopens it; the leader is restored and serves.
        let resp = g.write(put("2")).await.unwrap();
        assert_eq!(resp, CommandResponse::Kv(Ok(2)), "the second version of k");
        assert!(!g.is_dormant());
        let after = g.status();
        assert!(after.is_leader && after.term == before.term, "restored as leader in the same term");
        assert!(after.applied > before.applied);
        g.read_barrier().await.unwrap();
        g.shutdown().await;
        assert!(!g.is_dormant() && g.instance.live().is_none(), "stopped");
    }

    fn put(key: &str, v: &str) -> Command {
        use crate::command::{KvCommand, KvOp};
        Command::Kv(KvCommand {
            range_id: 1,
            epoch: 1,
            op: KvOp::Put { key: key.into(), value: v.into(), if_version: None },
        })
    }

    /// A single-voter group 7 (replica 3) holding `keys` keys, with a
    /// snapshot of all of it built: the group, its snapshot's bytes and the
    /// leader's vote.
    async fn leader_with_snapshot(
        ctx: &RaftContext,
        keys: usize,
    ) -> (GroupRaft, Vec<u8>, openraft::alias::VoteOf<TypeConfig>) {
        use openraft::async_runtime::WatchReceiver;
        let g = GroupRaft::create(ctx, 7, 3, SmState::Shard(crate::testing::whole_shard())).await.unwrap();
        g.initialize(BTreeMap::from([(3, ReplicaNode { node_id: 1, raft_addr: "127.0.0.1:9".into() })])).await.unwrap();
        until(10, "leadership", || g.status().is_leader).await;
        for k in 0..keys {
            g.write(put(&format!("k{k:03}"), "1")).await.unwrap();
        }
        let i = g.live().await.unwrap();
        i.raft.trigger().snapshot().await.unwrap();
        let applied = g.status().applied;
        until(10, "the snapshot", || {
            snapshot::latest(&ctx.snapshot_root, 7)
                .unwrap()
                .is_some_and(|(m, _)| m.last_log_id.map(|l| l.index) == applied)
        })
        .await;
        let (_, file) = snapshot::latest(&ctx.snapshot_root, 7).unwrap().unwrap();
        let vote = i.raft.metrics().borrow_watched().vote;
        (g, std::fs::read(&file.path).unwrap(), vote)
    }

    /// A fresh replica 4 of group 7, dormant.
    async fn dormant_replica(ctx: &RaftContext) -> GroupRaft {
        let g = GroupRaft::create(ctx, 7, 4, SmState::Shard(Default::default())).await.unwrap();
        assert!(g.instance.hibernate(|_| true).await);
        assert!(g.is_dormant());
        g
    }

    #[tokio::test]
    async fn a_dormant_replica_stores_snapshot_chunks_and_installs_the_snapshot() {
        use network::{RaftReply, RaftRpc};
        let (_a, ctx_a) = temp_ctx();
        let (a, bytes, vote) = leader_with_snapshot(&ctx_a, 40).await;
        let (_b, ctx_b) = temp_ctx();
        let b = dormant_replica(&ctx_b).await;
        let third = bytes.len() / 3;
        let parts = [&bytes[..third], &bytes[third..2 * third], &bytes[2 * third..]];
        let mut offset = 0;
        for (n, part) in parts.iter().enumerate() {
            let last = n == parts.len() - 1;
            let msg = RaftRpc::SnapshotChunk { transfer: 42, offset, data: part.to_vec(), done: last.then_some(vote) };
            let reply = network::handle(&b, &ctx_b.snapshot_root, msg).await.unwrap();
            if last {
                let RaftReply::Snapshot(resp) = reply else { panic!("the last chunk installs: {reply:?}") };
                assert_eq!(resp.vote, vote);
            } else {
                assert!(matches!(reply, RaftReply::ChunkStored));
                assert!(b.is_dormant(), "a chunk before the last is stored without reopening the replica");
            }
            offset += part.len() as u64;
        }
        assert!(!b.is_dormant(), "the last chunk reopened it");
        assert_eq!(b.keys(), 40);
        assert_eq!((b.keys(), b.size_bytes()), (a.keys(), a.size_bytes()));
        assert_eq!(b.status().applied, a.status().applied);
        assert_eq!(*b.state.read().unwrap(), *a.state.read().unwrap());
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn a_reopen_finishes_an_install_its_previous_instance_left_half_done() {
        let (_a, ctx_a) = temp_ctx();
        let (a, bytes, _) = leader_with_snapshot(&ctx_a, 25).await;
        let (_b, ctx_b) = temp_ctx();
        let b = dormant_replica(&ctx_b).await;
        // The instance ended in the middle of an install: the marker is
        // stored, the flag set, the in-memory state the old one.
        let file = ctx_b.snapshot_root.join("incoming.snap");
        std::fs::create_dir_all(&ctx_b.snapshot_root).unwrap();
        std::fs::write(&file, &bytes).unwrap();
        let cf = storage::cf(&ctx_b.db, CF_GROUP_META);
        ctx_b.db.put_cf(cf, state_key(7, tag::INSTALLING), file.to_string_lossy().as_bytes()).unwrap();
        b.set_installing(true);
        b.rouse().await;
        assert!(!b.is_dormant());
        assert!(!b.is_installing(), "the reopen finished the install");
        assert_eq!((b.keys(), b.size_bytes()), (a.keys(), a.size_bytes()));
        assert_eq!(*b.state.read().unwrap(), *a.state.read().unwrap(), "the state the install left");
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn a_reopen_whose_caller_gave_up_still_completes() {
        let (_d, ctx) = temp_ctx();
        let (g, _, _) = leader_with_snapshot(&ctx, 3).await;
        assert!(g.instance.hibernate(|_| true).await);
        // The caller polls once — the reopen has begun — then gives up.
        let mut barrier = Box::pin(g.read_barrier());
        assert!(futures::poll!(&mut barrier).is_pending(), "the reopen is under way");
        drop(barrier);
        until(10, "the abandoned reopen to finish", || g.instance.live().is_some()).await;
        let inc = g.instance.live_incarnation().unwrap();
        assert_eq!(g.write(put("k000", "2")).await.unwrap(), CommandResponse::Kv(Ok(2)));
        assert!(Arc::ptr_eq(&inc, &g.instance.live_incarnation().unwrap()), "one instance, not a second");
        g.shutdown().await;
        assert!(inc.has_ended());
    }

    #[tokio::test]
    async fn a_stopped_replica_reports_no_role_agrees_to_nothing_and_stores_no_chunk() {
        use openraft::async_runtime::WatchReceiver;
        let (_a, ctx) = temp_ctx();
        let (g, bytes, vote) = leader_with_snapshot(&ctx, 2).await;
        let last = g.live().await.unwrap().raft.metrics().borrow_watched().last_applied;
        g.shutdown().await;
        let st = g.status();
        assert!(!st.is_leader && st.leader.is_none(), "stopped: neither leader nor follower of one");
        let req = quiesce::Quiesce { leader: 3, vote, last_log: last };
        assert!(!g.quiesce_follower(&req), "a stopped replica does not agree to go quiet");
        let before: Vec<_> = std::fs::read_dir(snapshot::group_dir(&ctx.snapshot_root, 7))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        for done in [None, Some(vote)] {
            let msg = network::RaftRpc::SnapshotChunk { transfer: 9, offset: 0, data: bytes.clone(), done };
            assert!(network::handle(&g, &ctx.snapshot_root, msg).await.is_err());
        }
        let after: Vec<_> = std::fs::read_dir(snapshot::group_dir(&ctx.snapshot_root, 7))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(before, after, "no chunk stored for a stopped replica");
    }

    #[tokio::test]
    async fn a_stopped_replica_has_ended_its_incarnation() {
        let (_d, ctx) = temp_ctx();
        let g = GroupRaft::create(&ctx, 7, 3, SmState::Shard(Default::default())).await.unwrap();
        let inc = g.instance.live_incarnation().expect("a live instance");
        assert!(!inc.has_ended());
        g.shutdown().await;
        assert!(inc.has_ended(), "shutdown must fence the state-machine worker");
        assert!(g.read_barrier().await.is_err(), "a stopped replica does not reopen");
        assert!(!g.is_dormant());
    }
}

/// openraft's own storage test suite, run against our log store and state
/// machine on a temporary RocksDB (a fresh one per case).
#[cfg(test)]
mod storage_suite {
    use super::*;

    struct Builder;

    impl openraft::testing::log::StoreBuilder<TypeConfig, log_store::LogStore, GroupSm, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, log_store::LogStore, GroupSm), openraft::StorageError<TypeConfig>> {
            let (dir, db) = crate::testing::temp_db();
            let incarnation = Arc::new(incarnation::Incarnation::default());
            let group = 3;
            // What `GroupRaft::create` records before a group opens.
            let state = SmState::Shard(ShardState::default());
            let cf = storage::cf(&db, CF_GROUP_META);
            db.put_cf(cf, state_key(group, tag::SM_STATE), state.to_json().expect("state")).expect("write");
            let log = log_store::LogStore::new(db.clone(), group, Syncer::start(db.clone()), incarnation.clone());
            let sm = GroupSm {
                db,
                group,
                state: Arc::new(RwLock::new(state)),
                snapshot_root: dir.path().join("snapshots"),
                stats: Arc::default(),
                incarnation,
                installing: Arc::default(),
                failed: Arc::default(),
                mirrors: Arc::default(),
                clock: Arc::default(),
                resolved: Arc::new(tokio::sync::watch::Sender::new(0)),
            };
            Ok((dir, log, sm))
        }
    }

    #[tokio::test]
    async fn openraft_storage_suite_passes() {
        openraft::testing::log::Suite::test_all(Builder).await.expect("openraft storage suite");
    }
}
