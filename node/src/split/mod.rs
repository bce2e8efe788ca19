//! Live splits, the shards' side: a range `[a, c)` of shard A is split at
//! `b`, and `[b, c)` moves to a new Raft group B while clients keep reading
//! and writing (`docs/split-protocol.md`).
//!
//! The metadata leader walks each split through its phases (`ops::split`,
//! planned by the pure `ops::split_plan`); here is what the shards and
//! their leaders do:
//! - [`forwarder`], run by A's leader for each capture, copies the range
//!   from a RocksDB snapshot into B (backfill, as table files: [`sst`]) and
//!   ships A's forward log of writes to B in order (catch-up), keeping the
//!   verification digest; [`receive`] is the target replicas' side of the
//!   files' transfer.
//! - [`apply`] is what the shards do when the split's steps reach their logs.
//! - [`digest`]: the order-independent content digest both sides compare.
//! - [`split_key`]: where to split a range (by file boundaries when large).
//! - [`steps`]: the node-to-node calls the split makes (a step at a shard's
//!   leader, a target's receiving state, the split key, creating and
//!   destroying replicas).
//!
//! When to split on its own is decided by `balance::auto_split`.
//!
//! A range merge (`ops::merge`) runs the same machinery backwards: the
//! right range's shard captures its whole range into the left one's, which
//! receives it beside its own ranges (`BeginAbsorb`) and takes it over at
//! the cutover (`Absorb`), while the right shard is `Subsumed` and then
//! deleted.

pub mod apply;
pub mod digest;
pub mod forwarder;
pub mod mirror;
pub mod mirror_status;
pub mod receive;
pub mod split_key;
pub mod sst;
pub mod steps;

#[cfg(test)]
mod merge_tests;
