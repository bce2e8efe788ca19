//! HTTP JSON bodies: one definition for the server that writes them and the
//! client that reads them.
//!
//! Values are carried as raw JSON text ([`RawValue`]) so a node can store and
//! return exactly the bytes the user sent without decoding and re-encoding
//! them. Errors are always `{"error": {"code", "message", …}}` with an
//! honest HTTP status; [`ErrorCode::status`] is the single mapping.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::directory::NodeState;
use crate::range::{RangeDescriptor, Replica};
use crate::{NodeId, ShardId};

/// `PUT /v1/kv/{key}` body.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct PutBody {
    pub value: Box<RawValue>,
    /// Compare-and-set: the write applies only if the key's current version
    /// equals this (0 = the key must not exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_version: Option<u64>,
}

/// Answer to a successful write or delete.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WriteResult {
    pub key: String,
    pub version: u64,
}

/// Answer to a successful read; also one item of a scan.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Item {
    pub key: String,
    pub value: Box<RawValue>,
    pub version: u64,
}

/// Answer to `GET /v1/kv?start=&end=&limit=`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ScanResult {
    pub items: Vec<Item>,
    /// Pass as `start` to get the next page; absent when the scan is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `POST /v1/txn` body: if every `compare` holds, `success` runs, else
/// `failure` runs — all of it one atomic step, over keys on any shards.
#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct TxnRequest {
    #[serde(default)]
    pub compare: Vec<TxnCompare>,
    #[serde(default)]
    pub success: Vec<TxnOp>,
    #[serde(default)]
    pub failure: Vec<TxnOp>,
}

/// One comparison: the key's current version equals `version` (0: the key
/// does not exist).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TxnCompare {
    pub key: String,
    pub version: u64,
}

/// What an operation of a transaction does.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TxnOpKind {
    Put,
    Get,
    Delete,
}

/// One operation of a branch: `{"op": "put", "key", "value"}`,
/// `{"op": "get", "key"}` or `{"op": "delete", "key"}`. A flat struct, not
/// a tagged enum: serde cannot carry a raw JSON value through a tagged enum.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct TxnOp {
    pub op: TxnOpKind,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Box<RawValue>>,
}

/// One result, in the order of the branch's operations: a put or delete
/// gives `{"key", "version"}`, a get `{"key", "value", "version"}` or
/// `{"key", "found": false}`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TxnResult {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found: Option<bool>,
}

/// Answer to `POST /v1/txn`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TxnResponse {
    /// Whether every comparison held (the `success` branch ran).
    pub succeeded: bool,
    pub results: Vec<TxnResult>,
}

/// Read consistency requested with `?consistency=`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// Confirmed with a quorum (read index): sees every acknowledged write.
    #[default]
    Linearizable,
    /// Served from the local replica: may lag.
    Stale,
}

/// Machine-readable error codes. Each maps to one HTTP status.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    NotFound,
    VersionConflict,
    TooLarge,
    /// The request reached a shard that does not own the key at that epoch.
    StaleRoute,
    /// No leader or no quorum right now; retry later.
    Unavailable,
    /// The key's range is being cut over by a split; retry shortly.
    RangeMoving,
    Timeout,
    Internal,
    /// No credentials, or credentials the node does not know (401).
    Unauthenticated,
    /// Known credentials whose role does not allow the request (403).
    Forbidden,
    /// A watch's cursor is older than the history kept (410).
    Compacted,
}

impl ErrorCode {
    /// The HTTP status for this code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::VersionConflict => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::StaleRoute => 421,
            ErrorCode::Unavailable | ErrorCode::RangeMoving => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::Internal => 500,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::Compacted => 410,
        }
    }

    /// Whether a client may retry the same request unchanged.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorCode::Unavailable | ErrorCode::RangeMoving | ErrorCode::StaleRoute)
    }
}

/// The body of every error answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// Details of an error; optional fields depend on the code.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
    /// 409 and 404: the key's current version (0 = absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// 421: the current descriptors of the ranges the key now belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<Vec<RangeDescriptor>>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody { error: ErrorDetail { code, message: message.into(), version: None, ranges: None } }
    }
}

/// Liveness of a node as seen by the metadata leader's heartbeat tracker.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    Up,
    Suspect,
    Down,
    Unknown,
}

/// A node's condition in one word: its lifecycle state when it is leaving
/// or gone, else its liveness.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NodeCondition {
    Up,
    Suspect,
    Down,
    Unknown,
    Decommissioning,
    Removed,
}

impl NodeCondition {
    pub fn of(state: NodeState, liveness: Liveness) -> NodeCondition {
        match (state, liveness) {
            (NodeState::Removed, _) => NodeCondition::Removed,
            (NodeState::Decommissioning, _) => NodeCondition::Decommissioning,
            (NodeState::Active, Liveness::Up) => NodeCondition::Up,
            (NodeState::Active, Liveness::Suspect) => NodeCondition::Suspect,
            (NodeState::Active, Liveness::Down) => NodeCondition::Down,
            (NodeState::Active, Liveness::Unknown) => NodeCondition::Unknown,
        }
    }
}

/// One row of `GET /admin/nodes`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NodeStatus {
    pub id: NodeId,
    pub raft_addr: String,
    pub api_addr: Option<String>,
    /// up, suspect, down, unknown (not heard from yet), decommissioning, removed.
    pub status: NodeCondition,
    pub state: NodeState,
    pub liveness: Liveness,
    /// Milliseconds since the last heartbeat reached the metadata leader.
    pub last_heartbeat_ms: Option<u64>,
    pub replicas: usize,
    pub leaders: usize,
}

/// One row of `GET /admin/shards`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ShardStatus {
    pub shard_id: ShardId,
    /// Node id of the current leader, if known.
    pub leader: Option<NodeId>,
    pub replicas: Vec<Replica>,
    pub conf_version: u64,
    /// Approximate size of the shard's data in bytes, from the leader's report.
    pub size_bytes: Option<u64>,
    pub keys: Option<u64>,
    /// Client requests per second at the leader, from its last heartbeat.
    pub qps: Option<f64>,
    pub applied_index: Option<u64>,
    /// The Raft group's voter sets as its leader reports them: one set
    /// normally, two while a membership change is in its joint phase.
    #[serde(default)]
    pub raft_voters: Option<Vec<Vec<crate::ReplicaId>>>,
}

/// `POST /admin/split` body: split at `key`, or at the median key of `range_id`.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct SplitRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range_id: Option<u64>,
}

/// `POST /admin/merge` body: merge range `range_id` with its right-hand
/// neighbour.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MergeRequest {
    #[serde(default)]
    pub range_id: Option<u64>,
}

/// `PUT /admin/keyspaces/{prefix}` body: spread the keys under the prefix
/// over `hash_buckets` buckets (2–256).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KeyspaceRequest {
    #[serde(default)]
    pub hash_buckets: Option<u32>,
}

/// A hash-spread keyspace, as `GET /admin/keyspaces` lists it (and
/// `PUT /admin/keyspaces/{prefix}` answers once it is active).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KeyspaceView {
    pub prefix: String,
    pub hash_buckets: u32,
    /// Its buckets are ranges of their own: the declaration is over.
    pub active: bool,
}

/// `POST /admin/move` body: replace `shard_id`'s replica on `from_node` with
/// a new one on `to_node` (shard 0 is the metadata group).
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub shard_id: ShardId,
    pub from_node: NodeId,
    pub to_node: NodeId,
}

/// `POST /admin/transfer-leader` body.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct TransferLeaderRequest {
    pub shard_id: ShardId,
    pub to_node: NodeId,
}

/// Answer to a leader transfer: who leads now.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TransferLeaderResponse {
    pub shard_id: ShardId,
    pub leader: NodeId,
}

/// Answer to a split or move request.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct OperationStarted {
    pub operation_id: u64,
}

/// One operation as `GET /admin/operations` shows it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct OperationView {
    #[serde(flatten)]
    pub op: crate::Operation,
    /// Milliseconds spent in each phase entered so far (the current one up to now).
    pub phase_durations_ms: Vec<(crate::Phase, u64)>,
}

impl OperationView {
    /// Builds the view at wall-clock time `now_ms`.
    pub fn new(op: crate::Operation, now_ms: u64) -> OperationView {
        let mut phase_durations_ms = Vec::new();
        for (i, (phase, at)) in op.history.iter().enumerate() {
            let end = match op.history.get(i + 1) {
                Some((_, next)) => *next,
                None if phase.is_terminal() => *at,
                None => now_ms,
            };
            phase_durations_ms.push((*phase, end.saturating_sub(*at)));
        }
        OperationView { op, phase_durations_ms }
    }
}

/// `POST /admin/nodes/join` body, sent by a node started with `--join`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct JoinRequest {
    pub node_id: Option<NodeId>,
    pub raft_addr: String,
    pub api_addr: String,
}

/// Answer to a join: the node's id, and the RPC addresses of the metadata
/// group's replicas (where its heartbeats go first).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct JoinResponse {
    pub node_id: NodeId,
    #[serde(default)]
    pub seeds: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_body_keeps_value_bytes_and_rejects_unknown_fields() {
        let b: PutBody = serde_json::from_str(r#"{"value": {"a": [1, 2]}, "if_version": 3}"#).unwrap();
        assert_eq!(b.value.get(), r#"{"a": [1, 2]}"#);
        assert_eq!(b.if_version, Some(3));
        assert!(serde_json::from_str::<PutBody>(r#"{"value": 1, "iff_version": 3}"#).is_err());
        assert!(serde_json::from_str::<PutBody>(r#"{"if_version": 3}"#).is_err());
    }

    #[test]
    fn every_code_has_a_4xx_or_5xx_status() {
        for c in [
            ErrorCode::BadRequest,
            ErrorCode::NotFound,
            ErrorCode::VersionConflict,
            ErrorCode::TooLarge,
            ErrorCode::StaleRoute,
            ErrorCode::Unavailable,
            ErrorCode::RangeMoving,
            ErrorCode::Timeout,
        ] {
            assert!((400..600).contains(&c.status()), "{c:?}");
        }
        assert_eq!(serde_json::to_string(&ErrorCode::StaleRoute).unwrap(), "\"stale_route\"");
    }
}

/// One line of `GET /v1/watch` (NDJSON). Every `put` and `delete` carries
/// the cursor that resumes the watch right after it; a `progress` line says
/// every change up to its cursor has been sent; an `error` line ends the
/// stream (`slow`: the watcher read too slowly and may resume from its
/// last cursor; `compacted`: the history after its position is gone).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchEvent {
    Put {
        key: String,
        value: serde_json::Value,
        version: u64,
        cursor: String,
        /// The value replaced (asked for with `prev=true`; absent when the
        /// key had none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prev: Option<PrevValue>,
    },
    Delete {
        key: String,
        version: u64,
        cursor: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prev: Option<PrevValue>,
    },
    Progress {
        cursor: String,
    },
    Error {
        code: String,
        message: String,
    },
}

/// A watched key's value before a change.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PrevValue {
    pub value: serde_json::Value,
    pub version: u64,
}

impl WatchEvent {
    /// The cursor to resume after this line, if it has one.
    pub fn cursor(&self) -> Option<&str> {
        match self {
            WatchEvent::Put { cursor, .. } | WatchEvent::Delete { cursor, .. } | WatchEvent::Progress { cursor } => {
                Some(cursor)
            }
            WatchEvent::Error { .. } => None,
        }
    }
}
