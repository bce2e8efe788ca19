//! Internal RPC between nodes: Raft traffic for every group, plus the few
//! node-to-node requests (forwarded reads and writes, metadata proposals,
//! heartbeats).
//!
//! Everything travels as length-prefixed bincode frames tagged with a
//! request id over persistent TCP connections, one per peer and *lane*
//! ([`transport`]): Raft messages and node requests share the default lane,
//! snapshot chunks go on the bulk lane so a large transfer never queues
//! ahead of heartbeats and votes. Many groups and many concurrent requests
//! share each connection.
//!
//! Node-level requests are declared once (the `node_calls!` list below):
//! each is a struct with its own reply type, tied together by [`NodeCall`].

pub mod transport;

use cleave_metadata::api::{Liveness, NodeStatus, ShardStatus};
use cleave_metadata::{Directory, MetaCommand, MetaError, MetaResponse, NodeId, OpId, ShardId};
use serde::{Deserialize, Serialize};

pub use transport::{Lane, RpcError, Transport};

use crate::command::{KvCommand, KvError, ShardCommand, StepError};
use crate::kv::Incoming;
use crate::raft::membership::{ConfigId, MembershipView};
use crate::raft::network::{RaftReply, RaftRpc};
use crate::raft::SmState;

/// A request from one node to another.
#[derive(Serialize, Deserialize, Debug)]
pub enum Request {
    /// A Raft message for the local replica of `group`.
    Raft {
        group: u64,
        msg: RaftRpc,
    },
    Node(NodeRequest),
}

/// The answer to a [`Request`].
#[derive(Serialize, Deserialize, Debug)]
#[allow(clippy::large_enum_variant)] // short-lived, serialised at once
pub enum Response {
    Raft(Result<RaftReply, String>),
    Node(Result<NodeReply, ExecError>),
}

/// Declares the node-level requests: one struct per request, the wire
/// enums [`NodeRequest`] and [`NodeReply`] (a reply variant per request,
/// of the request's own reply type), and [`NodeCall`] tying each request to
/// its reply — so a caller gets the reply it asked for, typed, and the one
/// place that could meet a mismatched reply is [`NodeCall::reply`].
macro_rules! node_calls {
    ($( $(#[$doc:meta])* $name:ident { $( $(#[$fdoc:meta])* $field:ident : $ty:ty ),* $(,)? } -> $reply:ty; )*) => {
        $(
            $(#[$doc])*
            #[derive(Serialize, Deserialize, Debug, Clone)]
            pub struct $name { $( $(#[$fdoc])* pub $field: $ty ),* }

            impl NodeCall for $name {
                type Reply = $reply;
                fn request(self) -> NodeRequest {
                    NodeRequest::$name(self)
                }
                fn reply(r: NodeReply) -> Result<$reply, ExecError> {
                    match r {
                        NodeReply::$name(v) => Ok(v),
                        #[allow(unreachable_patterns)]
                        other => Err(ExecError::Internal(format!(
                            "{} answered with {other:?}",
                            stringify!($name)
                        ))),
                    }
                }
            }
        )*

        /// A node-level request, as it travels.
        #[derive(Serialize, Deserialize, Debug)]
        pub enum NodeRequest { $( $name($name), )* }

        /// The answer to a [`NodeRequest`]: the variant of the same name.
        #[derive(Serialize, Deserialize, Debug)]
        #[allow(clippy::large_enum_variant)] // short-lived, serialised at once
        pub enum NodeReply { $( $name($reply), )* }
    };
}

/// A node-level request and the type of its answer.
pub trait NodeCall: Send + 'static {
    type Reply: Send;
    /// The request as it travels.
    fn request(self) -> NodeRequest;
    /// The typed answer out of a reply (an error if it is another's).
    fn reply(r: NodeReply) -> Result<Self::Reply, ExecError>;
}

node_calls! {
    /// Apply a KV write through the shard's leader; answers its version.
    /// `budget_ms`, here and in the reads: the time left of the client's
    /// deadline when sent.
    KvWrite { shard: ShardId, cmd: KvCommand, hops: u8, budget_ms: u64 } -> u64;
    /// Read one key from the shard (`linearizable`: through the leader):
    /// `(version, json)` of a live key, or nothing.
    KvRead { shard: ShardId, key: String, linearizable: bool, hops: u8, budget_ms: u64 } -> Option<(u64, String)>;
    /// Read live items in `[start, end)` from the shard's leader.
    KvScan { shard: ShardId, start: String, end: Option<String>, limit: usize, hops: u8, budget_ms: u64 }
        -> Vec<(String, u64, String)>;
    /// Propose a directory change through the metadata leader.
    MetaPropose { cmd: MetaCommand, hops: u8 } -> MetaResponse;
    /// A node's periodic report to the metadata leader.
    Heartbeat { hb: NodeReport, hops: u8 } -> HeartbeatAck;
    /// The metadata leader's view of the cluster.
    GetClusterView { hops: u8 } -> ClusterView;
    /// Apply a split step through the shard's leader; answers the step's index.
    /// `at`: the entry's stamp (0: the leader's clock), see `Command::At`.
    /// Answers the entry's answer and the leader's clock after it applied.
    ShardStep { shard: ShardId, cmd: ShardCommand, at: crate::clock::Ts, hops: u8 } -> (u64, crate::clock::Ts);
    /// Create (and initialise) a local replica of a new group; `campaign`
    /// makes it stand for election at once. With no `members` the replica
    /// joins an existing group: it waits, uninitialised, for the leader to
    /// add it as a learner. `dir_version` is the sender's directory version,
    /// which already lists the replica: the node does not garbage-collect it
    /// before its own directory is that new.
    CreateGroup {
        group: u64,
        replica_id: u64,
        members: Vec<(u64, NodeId, String)>,
        state: Box<SmState>,
        campaign: bool,
        dir_version: u64,
    } -> ();
    /// The state a group started from (see `tag::GENESIS`), from any replica.
    Genesis { group: u64, hops: u8 } -> SmState;
    /// A membership step (or just a look) at the group's leader; answers the
    /// configuration afterwards.
    Membership { group: u64, change: MembershipChange, hops: u8 } -> MembershipView;
    /// Ask the metadata leader to start a replica move; answers its id.
    StartMove { shard_id: ShardId, from_node: NodeId, to_node: NodeId, reason: String, hops: u8 } -> OpId;
    /// Remove the local replica `replica_id` of `group` and all its data (a
    /// different replica held there is left alone).
    DestroyGroup { group: u64, replica_id: u64 } -> ();
    /// A split target's receiving state, from its leader.
    IncomingStatus { shard: ShardId, hops: u8 } -> TargetStatus;
    /// A split source's forwarding progress for one operation, from its leader.
    SplitStatus { shard: ShardId, op_id: OpId, hops: u8 } -> ForwardStatus;
    /// A key near the middle of `[start, end)` of the shard: by key count, or
    /// (`by_load`) of recently requested keys.
    MedianKey { shard: ShardId, start: String, end: Option<String>, by_load: bool, hops: u8 } -> Option<String>;
    /// Ask the metadata leader to start a split (at `key`, or at the median
    /// of range `range_id`); answers its id.
    StartSplit { range_id: Option<u64>, key: Option<String>, reason: String, hops: u8 } -> OpId;
    /// Node-level liveness probe (`node::liveness`), one per pair of nodes
    /// instead of Raft heartbeats per group.
    Ping { from: NodeId } -> Pong;
    /// One chunk of a split's backfill file for the local replica of a
    /// receiving shard (`split::receive`); sent on the bulk lane.
    SplitChunk { chunk: crate::split::receive::Chunk } -> ();
    /// Apply a transaction step through the shard's leader (`txn`).
    TxnStep { shard: ShardId, cmd: crate::txn::TxnCommand, at: crate::clock::Ts, hops: u8, budget_ms: u64 }
        -> crate::txn::TxnReply;
    /// How far the node's copy of a mirrored split has got (starting it if
    /// the node holds both replicas and has not begun): `split::mirror`.
    MirrorStatus { spec: Box<crate::split::mirror::MirrorSpec> } -> Option<crate::split::mirror::MirrorReport>;
    /// A shard's changes after a position, from the replica on the called
    /// node, waiting for some up to `req.wait_ms` (`watch::serve`).
    WatchChanges { shard: ShardId, req: crate::watch::serve::ChangesRequest } -> crate::watch::serve::ChangesReply;
    /// Ask the metadata leader to merge range `range_id` with its
    /// right-hand neighbour; answers the operation's id.
    StartMerge { range_id: u64, reason: String, hops: u8 } -> OpId;
    /// Ask the metadata leader to declare a hash-spread keyspace; answers
    /// once it is active (`keyspace::declare`).
    DeclareKeyspace { prefix: String, buckets: u32, hops: u8 } -> cleave_metadata::keyspace::Keyspace;
}

/// The answer to a [`Ping`]: the groups whose replica on the answering node
/// a storage error stopped (a quiet group whose leader failed there must
/// elect another, as if the node were dead).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Pong {
    pub failed: Vec<u64>,
}

/// A split target's receiving state (`None` once it no longer receives),
/// whether it serves ranges, and the live keys and bytes it received for
/// the split (so far, or when it was activated).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct TargetStatus {
    pub incoming: Option<Incoming>,
    pub active: bool,
    pub keys: u64,
    pub bytes: u64,
}

/// A membership step carried out by a group's leader (see `raft::membership`).
/// The voter changes (`EnterJoint`, `ChangeVoters`, `RemoveLearners`) carry
/// the configuration id of the view their driver decided from; the leader
/// refuses them if the group's configuration is another.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// Change nothing; answer with the current configuration.
    Observe,
    AddLearner {
        replica: u64,
        node_id: NodeId,
        raft_addr: String,
    },
    EnterJoint {
        from: u64,
        to: u64,
        expected: ConfigId,
    },
    ChangeVoters {
        voters: std::collections::BTreeSet<u64>,
        expected: ConfigId,
    },
    RemoveLearners {
        learners: std::collections::BTreeSet<u64>,
        expected: ConfigId,
    },
    TransferLeader {
        to: u64,
    },
}

/// How far a split source's leader has got with one capture.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardStatus {
    /// The backfill attempt under way (0: none, or done by an earlier forwarder).
    pub attempt: u64,
    pub backfill_done: bool,
    pub keys_copied: u64,
    pub bytes_copied: u64,
    pub keys_total: u64,
    pub bytes_total: u64,
    /// Source log index of the newest forward-log entry.
    pub last_seq: u64,
    /// Newest forward-log entry the target has acknowledged.
    pub shipped: u64,
    /// The last shipping round shipped every entry there was when it began
    /// (`last_seq` above is newer: the writes made while it shipped).
    pub drained: bool,
    /// The source's content digest of the range, once frozen and complete.
    pub digest: Option<u64>,
    pub frozen_at: Option<u64>,
    /// The freeze entry's timestamp (0 until frozen): a merge's target
    /// takes the range's history from there on (`kv::Absorbed`).
    pub frozen_ts: crate::clock::Ts,
    /// The target's copies disagree (a mirrored split): give it up.
    pub mismatch: Option<String>,
}

/// What a node reports every `--node-heartbeat-ms` (1 s by default).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NodeReport {
    pub node_id: NodeId,
    pub raft_addr: String,
    pub api_addr: String,
    /// The directory version the node already has.
    pub directory_version: u64,
    /// Its replicas' figures: all of them, or (`base` set) those that
    /// changed since report `base` (see `leader::delta`).
    pub groups: Vec<GroupReport>,
    /// This report's number, per node run.
    pub seq: u64,
    /// The report this one builds on; `None`: a whole report.
    pub base: Option<u64>,
    /// Groups held at `base` and no longer.
    pub gone: Vec<u64>,
    /// The number of the shard-leader map the node holds.
    pub leaders_version: u64,
}

/// Per-replica figures in a heartbeat.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct GroupReport {
    pub group: u64,
    /// The replica held (the metadata leader compares it with the directory).
    pub replica_id: u64,
    pub is_leader: bool,
    pub term: u64,
    pub applied: Option<u64>,
    /// Approximate bytes of user data (shards only).
    pub size_bytes: Option<u64>,
    /// Live keys (shards only).
    pub keys: Option<u64>,
    /// Client requests per second served by this replica since the last report.
    pub qps: f64,
    /// The leader's voter sets (two while joint); `None` from followers.
    pub voters: Option<Vec<Vec<u64>>>,
}

/// The metadata leader's answer to a heartbeat.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct HeartbeatAck {
    /// Present when newer than the version the node reported.
    pub directory: Option<Directory>,
    /// Known shard leaders, group → node: present when the node's copy
    /// (`NodeReport::leaders_version`) is not `leaders_version`.
    pub leaders: Option<Vec<(u64, NodeId)>>,
    pub leaders_version: u64,
    /// The report built on one the leader does not hold: send a whole one.
    pub need_full: bool,
}

/// The cluster as the metadata leader sees it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ClusterView {
    pub directory: Directory,
    pub nodes: Vec<NodeStatus>,
    pub shards: Vec<ShardStatus>,
    pub leaders: Vec<(u64, NodeId)>,
    pub liveness: Vec<(NodeId, Liveness)>,
}

/// Why a node-level request failed, in a form that crosses the wire.
#[derive(Serialize, Deserialize, Debug, Clone, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Kv(#[from] KvError),
    /// A split step the shard refused when it applied it.
    #[error(transparent)]
    Step(#[from] StepError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("no leader for group {group} right now")]
    NoLeader { group: u64 },
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// The request itself is wrong (an admin request naming a member that
    /// does not exist, say).
    #[error("{0}")]
    BadRequest(String),
    /// A membership change was refused as things stand (another change in
    /// progress, a precondition failed); look again and retry.
    #[error("refused: {0}")]
    Refused(String),
    #[error("internal error: {0}")]
    Internal(String),
}
