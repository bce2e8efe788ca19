//! Test harness for CleaveDB integration tests.
//!
//! Every multi-node test starts real `cleave-node` processes on 127.0.0.1
//! with free ports and temporary data directories ([`Cluster`]), talks to
//! them over raw HTTP ([`Http`]) to check the wire contract, and synchronises
//! only by polling with a deadline ([`wait_until`], [`wait_for`]).
//!
//! The server binary is found through the env var `CLEAVE_NODE_BIN`, else at
//! `<dir of the test executable>/../cleave-node` (`target/release/cleave-node`).
//! Build it first with `cargo build --release --bins`.
//!
//! Node processes are killed when their [`Cluster`] is dropped (also while a
//! test panics) and, through `PR_SET_PDEATHSIG`, when the test process dies.
//! On a failing test the tail of every node's log is printed; set
//! `CLEAVE_KEEP_DATA=1` to keep the data directories and full logs.

pub mod cluster;
pub mod http;
pub mod ledger;
pub mod model;
pub mod ops;
pub mod wait;
pub mod watching;

pub use cluster::{free_ports, Cluster, ClusterOpts, ExtraNode, NodeHandle};
pub use http::{Http, Resp};
pub use model::{Expected, Model};
pub use wait::{wait_for, wait_until};

pub use cleave_metadata::api::{
    ErrorBody, ErrorCode, Item, Liveness, NodeCondition, NodeStatus, OperationStarted, OperationView, ScanResult,
    ShardStatus, WriteResult,
};
pub use cleave_metadata::{NodeId, OpKind, Operation, Phase, RangeDescriptor, RangeState, ShardId};

use std::time::Duration;

/// The shard that owns every key at bootstrap.
pub const FIRST_SHARD: ShardId = 1;

/// Seconds, as a [`Duration`]: keeps deadlines short to write.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Parses an item's raw JSON value, for comparison with what was written.
pub fn value_of(item: &Item) -> serde_json::Value {
    serde_json::from_str(item.value.get()).unwrap_or_else(|e| panic!("item {:?} has invalid JSON value: {e}", item.key))
}
