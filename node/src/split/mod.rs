//! Live splits: a range `[a, c)` of shard A is split at `b`, and `[b, c)`
//! moves to a new Raft group B while clients keep reading and writing.
//!
//! The protocol (`split-protocol.md`) is carried out by three cooperating
//! parts, each resumable because every decision is a Raft entry:
//! - [`driver`], run by the metadata leader, walks each operation through
//!   its phases (create B, begin capture, freeze, verify, commit, activate).
//! - [`forwarder`], run by A's leader for each capture, streams the range
//!   from a RocksDB snapshot into B (backfill) and ships A's forward log of
//!   writes to B in order (catch-up), keeping the verification digest.
//! - [`apply`] is what the shards do when those steps reach their logs.
//!
//! [`rebalancer`] decides when to split on its own (size and load).

pub mod apply;
pub mod digest;
pub mod driver;
pub mod forwarder;
pub mod rebalancer;
pub mod steps;
