//! Raft messages between replicas of a group, carried by the node's RPC
//! transport (connections per peer node shared by every group: snapshot
//! chunks on the bulk lane, every other message on the default lane).
//!
//! The sending half implements openraft's network traits for one group and
//! one target; the receiving half ([`handle`]) hands a message to the local
//! replica of the group it names. Snapshots travel as a sequence of chunks
//! of the snapshot file, so neither side holds a whole shard in memory.

use std::future::Future;
use std::io::{Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openraft::alias::{SnapshotOf, VoteOf};
use openraft::async_runtime::WatchReceiver;
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, RaftNetworkV2};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::snapshot::{self, SnapshotFile};
use super::{GroupRaft, ReplicaNode, TypeConfig};
use crate::rpc::{self, Lane, Transport};

/// Test fault points: whether `POST /admin/fault/isolate-meta` is served
/// (`--fault-api true`), and whether this node's metadata-group Raft
/// traffic is cut, both ways — the node stays reachable for everything
/// else, like a metadata leader partitioned from the other metadata
/// replicas only.
pub static FAULT_API: AtomicBool = AtomicBool::new(false);
pub static ISOLATE_META: AtomicBool = AtomicBool::new(false);

fn meta_isolated(group: u64) -> bool {
    group == cleave_metadata::META_GROUP && ISOLATE_META.load(Ordering::Relaxed)
}

/// Size of one snapshot chunk on the wire.
const SNAPSHOT_CHUNK: usize = 1 << 20;

/// A Raft message for one group.
#[derive(Serialize, Deserialize, Debug)]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    PreVote(VoteRequest<TypeConfig>),
    /// Part of a snapshot file; `done` carries the leader's vote with the last part.
    SnapshotChunk {
        transfer: u64,
        offset: u64,
        data: Vec<u8>,
        done: Option<VoteOf<TypeConfig>>,
    },
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// The leader asks the replica to go quiet (see `raft::quiesce`).
    Quiesce(super::quiesce::Quiesce),
}

/// The answer to a [`RaftRpc`].
#[derive(Serialize, Deserialize, Debug)]
pub enum RaftReply {
    Append(AppendEntriesResponse<TypeConfig>),
    Vote(VoteResponse<TypeConfig>),
    ChunkStored,
    Snapshot(SnapshotResponse<TypeConfig>),
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    /// Whether the replica went quiet.
    Quiesced(bool),
}

/// Creates per-target clients for one group.
pub struct NetworkFactory {
    pub(super) group: u64,
    pub(super) transport: Transport,
    pub(super) addresses: super::AddressBook,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, _target: u64, node: &ReplicaNode) -> GroupNetwork {
        GroupNetwork {
            group: self.group,
            node_id: node.node_id,
            recorded_addr: node.raft_addr.clone(),
            addresses: self.addresses.clone(),
            transport: self.transport.clone(),
        }
    }
}

/// The client side of one group's link to one target replica.
///
/// The target's address is looked up at every send: the node's current
/// address from the directory (a node restarted on another port
/// re-registers it), else the one recorded in the group's membership when
/// the replica was added.
pub struct GroupNetwork {
    group: u64,
    node_id: cleave_metadata::NodeId,
    recorded_addr: String,
    addresses: super::AddressBook,
    transport: Transport,
}

impl GroupNetwork {
    fn addr(&self) -> String {
        self.addresses.get(self.node_id).unwrap_or_else(|| self.recorded_addr.clone())
    }
}

fn unreachable(msg: impl std::fmt::Display) -> Unreachable<TypeConfig> {
    Unreachable::new(&AnyError::error(msg.to_string()))
}

impl GroupNetwork {
    async fn call(&self, msg: RaftRpc, ttl: Duration) -> Result<RaftReply, Unreachable<TypeConfig>> {
        if meta_isolated(self.group) {
            return Err(unreachable("fault point: metadata group traffic cut"));
        }
        let lane = if matches!(msg, RaftRpc::SnapshotChunk { .. }) { Lane::Bulk } else { Lane::Default };
        let req = rpc::Request::Raft { group: self.group, msg };
        match self.transport.call_on(lane, &self.addr(), req, ttl).await {
            Ok(rpc::Response::Raft(Ok(reply))) => Ok(reply),
            Ok(rpc::Response::Raft(Err(e))) => Err(unreachable(e)),
            Ok(other) => Err(unreachable(format!("unexpected reply {other:?}"))),
            Err(e) => Err(unreachable(e)),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for GroupNetwork {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::Append(rpc), option.hard_ttl()).await? {
            RaftReply::Append(r) => Ok(r),
            other => Err(unreachable(format!("unexpected reply {other:?}")).into()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::Vote(rpc), option.hard_ttl()).await? {
            RaftReply::Vote(r) => Ok(r),
            other => Err(unreachable(format!("unexpected reply {other:?}")).into()),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::PreVote(rpc), option.hard_ttl()).await? {
            RaftReply::Vote(r) => Ok(r),
            other => Err(unreachable(format!("unexpected reply {other:?}")).into()),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::TransferLeader(req), option.hard_ttl()).await? {
            RaftReply::TransferLeader(r) => Ok(r),
            other => Err(unreachable(format!("unexpected reply {other:?}")).into()),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let send = async {
            let mut file = tokio::fs::File::open(&snapshot.snapshot.path).await.map_err(unreachable)?;
            let transfer: u64 = rand::random();
            let mut offset = 0u64;
            let mut buf = vec![0u8; SNAPSHOT_CHUNK];
            loop {
                let mut filled = 0;
                while filled < buf.len() {
                    let n = file.read(&mut buf[filled..]).await.map_err(unreachable)?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                let last = filled < buf.len();
                let msg = RaftRpc::SnapshotChunk {
                    transfer,
                    offset,
                    data: buf[..filled].to_vec(),
                    done: last.then_some(vote),
                };
                let ttl = if last { option.hard_ttl().max(Duration::from_secs(60)) } else { option.hard_ttl() };
                match self.call(msg, ttl).await? {
                    RaftReply::ChunkStored if !last => offset += filled as u64,
                    RaftReply::Snapshot(r) if last => return Ok(r),
                    other => return Err(unreachable(format!("unexpected reply {other:?}"))),
                }
            }
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = send => r.map_err(StreamingError::Unreachable),
        }
    }
}

/// Handles a Raft message addressed to `group`'s local replica.
pub async fn handle(g: &GroupRaft, snapshot_root: &Path, msg: RaftRpc) -> Result<RaftReply, String> {
    if meta_isolated(g.group) {
        return Err("fault point: metadata group traffic cut".into());
    }
    // A request to go quiet is answered from the metrics (a dormant
    // replica is quiet already; a stopped one refuses), and a snapshot's
    // chunks are files: neither needs the instance. Everything else does,
    // reopening a dormant one.
    let msg = match msg {
        RaftRpc::Quiesce(req) => return Ok(RaftReply::Quiesced(g.quiesce_follower(&req))),
        RaftRpc::SnapshotChunk { .. } if g.instance.is_stopped() || g.is_failed() => {
            return Err(format!("replica {} of group {} is out of service", g.replica_id, g.group));
        }
        RaftRpc::SnapshotChunk { transfer, offset, data, done: None } => {
            store_chunk(snapshot_root, g.group, transfer, offset, data).await?;
            return Ok(RaftReply::ChunkStored);
        }
        msg => msg,
    };
    let instance = g.live().await.map_err(|e| e.to_string())?;
    let raft = &instance.raft;
    match msg {
        RaftRpc::Append(req) => {
            // Entries wake a quiet follower (its timer then starts from this
            // contact); a bare heartbeat — a quiet leader's read-index round —
            // only counts as contact.
            let carries_entries = !req.entries.is_empty();
            let resp = raft.append_entries(req).await.map_err(|e| e.to_string())?;
            if !matches!(resp, AppendEntriesResponse::HigherVote(_)) {
                g.note_leader_contact();
                if carries_entries {
                    g.wake_follower(raft);
                }
            }
            Ok(RaftReply::Append(resp))
        }
        RaftRpc::Quiesce(req) => Ok(RaftReply::Quiesced(g.quiesce_follower(&req))),
        RaftRpc::Vote(req) => raft.vote(req).await.map(RaftReply::Vote).map_err(|e| e.to_string()),
        RaftRpc::PreVote(req) => raft.pre_vote(req).await.map(RaftReply::Vote).map_err(|e| e.to_string()),
        RaftRpc::TransferLeader(req) => {
            // openraft sends this to every voter, and the leader stops
            // heartbeating: from the current leader (not a stale request),
            // every voter wakes — the target to campaign (its timer retries
            // a failed campaign), the others so that, should the target
            // never get elected, their timers elect someone.
            let current = raft.metrics().borrow_watched().vote;
            if *req.from_leader() == current {
                g.quiescence.force_wake(raft);
            }
            raft.handle_transfer_leader(req).await.map(RaftReply::TransferLeader).map_err(|e| e.to_string())
        }
        RaftRpc::SnapshotChunk { transfer, offset, data, done } => {
            let part = store_chunk(snapshot_root, g.group, transfer, offset, data).await?;
            let Some(vote) = done else { return Ok(RaftReply::ChunkStored) };
            let file = tokio::task::spawn_blocking(move || snapshot::finish_receive(&part))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let meta = snapshot::read_meta(&file.path).map_err(|e| e.to_string())?;
            let snap = SnapshotOf::<TypeConfig, SnapshotFile> { meta, snapshot: file };
            let resp = raft.install_full_snapshot(vote, snap).await.map_err(|e| e.to_string())?;
            // Refused (a deposed leader's late snapshot): no contact, no wake.
            if resp.vote == vote {
                g.note_leader_contact();
                g.wake_follower(raft);
            }
            Ok(RaftReply::Snapshot(resp))
        }
    }
}

/// Appends a snapshot chunk received for `group` to its partial file, which
/// must hold exactly `offset` bytes already (0: a new file). Answers the path.
async fn store_chunk(
    root: &Path,
    group: u64,
    transfer: u64,
    offset: u64,
    data: Vec<u8>,
) -> Result<std::path::PathBuf, String> {
    let part = snapshot::receive_path(root, group, transfer).map_err(|e| e.to_string())?;
    let path = part.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut f = if offset == 0 {
            std::fs::File::create(&path)?
        } else {
            std::fs::OpenOptions::new().write(true).open(&path)?
        };
        let len = f.seek(std::io::SeekFrom::End(0))?;
        if len != offset {
            return Err(std::io::Error::other(format!("snapshot chunk at {offset}, file has {len}")));
        }
        f.write_all(&data)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    Ok(part)
}
