//! The CleaveDB client: a Rust library and the `cleave` command-line tool.
//!
//! CleaveDB splits the key space into ranges, each owned by a shard (a Raft
//! group) whose leader serves its writes and linearizable reads. Any node
//! accepts any request and forwards it, so the simplest client just talks to
//! one node. This client does better: it caches the directory (key → range →
//! shard → leader → address) and sends each request straight to the leader,
//! and it rides out the cluster's normal turbulence (leader elections, range
//! splits, node restarts) by refreshing the cache and retrying with bounded,
//! jittered backoff under an overall deadline.
//!
//! The crate is layered so that the parts worth testing are pure:
//!
//! - [`routing`]: the routing table (no I/O), unit-tested on its own.
//! - [`retry`]: the retry policy and which failures may be retried (no I/O).
//! - [`error`]: the typed [`Error`] and how an error answer decodes into it.
//! - [`endpoint`]: address normalisation and percent-encoding of keys.
//! - [`options`]: timeouts, retry budget, routing switch.
//! - `transport`: the retry loop that ties them to HTTP.
//! - [`client`]: [`Client`], one async method per API operation, including
//!   the admin ones: cluster status; splits and replica moves with their
//!   operations (start, list, follow, cancel); leader transfers; and node
//!   decommissioning (start, follow).
//! - [`watch`]: [`Client::watch`], a change stream that reconnects by
//!   itself from its last cursor.
//!
//! Wire types (bodies of requests and answers) are not redefined here: they
//! are the ones in [`cleave_metadata::api`], re-exported below for
//! convenience, so client and server can never disagree about them.

pub mod client;
pub mod endpoint;
pub mod error;
#[cfg(test)]
mod mock;
pub mod options;
pub mod retry;
pub mod routing;
pub mod tls;
mod transport;
pub mod watch;

pub use client::{Client, MAX_SCAN_LIMIT};
pub use error::{Error, Result};
pub use options::ClientOptions;
pub use retry::RetryPolicy;
pub use routing::{Route, RoutingTable};

pub use cleave_metadata;
pub use cleave_metadata::api::{
    Consistency, ErrorBody, ErrorCode, ErrorDetail, Item, KeyspaceView, Liveness, NodeCondition, NodeStatus,
    OperationView, PrevValue, ScanResult, ShardStatus, TxnCompare, TxnOp, TxnOpKind, TxnRequest, TxnResponse,
    TxnResult, WatchEvent, WriteResult,
};
pub use cleave_metadata::{
    Directory, NodeId, OpId, OpKind, Operation, Phase, Progress, RangeDescriptor, Replica, ShardId, META_GROUP,
};
pub use watch::WatchRequest;
