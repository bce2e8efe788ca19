//! The CleaveDB directory model and the wire types shared by server and client.
//!
//! This crate is pure logic: no I/O, no async, no Raft. The node embeds a
//! [`Directory`] in the state machine of the metadata Raft group (group 0), and
//! every router and client uses the same [`Directory`] type as a cache. Because
//! all of them use one definition, a range descriptor means exactly the same
//! thing in the metadata group, in a shard's fencing check, in a 421 answer and
//! in the client's routing table.
//!
//! - [`range`]: range descriptors and the key-space tiling invariant.
//! - [`directory`]: nodes, shards, ranges, id allocation and the commands that
//!   change them (applied deterministically by every metadata replica).
//! - [`operation`]: long-running operations (splits, merges, moves) and
//!   their phases.
//! - [`keyspace`]: hash-spread keyspaces: user keys to bucketed internal
//!   keys and back.
//! - [`api`]: the HTTP JSON request, response and error bodies.

pub mod api;
pub mod directory;
pub mod keyspace;
pub mod operation;
pub mod range;

pub use directory::{Directory, MetaCommand, MetaError, MetaResponse, NodeDescriptor, NodeState};
pub use operation::{OpId, OpKind, Operation, Phase, Progress};
pub use range::{RangeDescriptor, RangeState, Replica, ShardDescriptor};

/// A node (one `cleave-node` process) in the cluster.
pub type NodeId = u64;
/// A shard, which is one Raft group. Group 0 is the metadata group.
pub type ShardId = u64;
/// A range of keys `[start, end)` owned by one shard.
pub type RangeId = u64;
/// A Raft member: one replica of one group on one node. Never reused.
pub type ReplicaId = u64;

/// The group id of the metadata Raft group.
pub const META_GROUP: ShardId = 0;

/// Largest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 4 * 1024;
/// Default largest value accepted, in bytes of its JSON text.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
