//! Watch: a resumable stream of every change to a key range, across
//! splits and failovers (`GET /v1/watch`; the design is
//! `docs/plans/watch.md`).
//!
//! - **Timestamps.** Every entry a shard applies gets a timestamp from the
//!   hybrid logical clock of its proposer ([`crate::clock`]), raised to
//!   above the shard's last one, so a shard's timestamps increase with its
//!   log. A transaction's writes all carry its commit timestamp, on every
//!   shard ([`crate::txn`]).
//! - **The change log** ([`changes`]): each change is stored under its
//!   timestamp beside the data, in the same batch; trimmed by age and size.
//! - **Resolved timestamp** ([`crate::kv::ShardState::resolved`]): no change
//!   at or below it will ever appear in the shard — the last timestamp,
//!   held below the oldest write lock a transaction still holds (its commit
//!   comes later, at a timestamp above the lock's). Everything up to it
//!   can be emitted for good; an idle watched shard is moved on by `Close`
//!   entries.
//! - **Lineage.** A split's target records where its range's earlier
//!   changes are ([`crate::kv::Born`]); a watch from an older cursor reads
//!   them there first. A cursor ([`cursor`]) is a `(timestamp, origin, key)`
//!   position, valid on every node.

pub mod changes;
pub mod cursor;
pub mod feed;
pub mod lines;
pub mod outbox;
pub mod plan;
pub mod serve;
pub mod stream;
pub mod trim;

/// The node's watch knobs (`--watch-*`).
#[derive(Clone, Debug)]
pub struct WatchSettings {
    /// Changes younger than this are kept.
    pub retention: std::time::Duration,
    /// At most this many bytes of change log per shard.
    pub retention_bytes: u64,
    /// Events queued for a watcher at most (see `outbox`).
    pub queue_bytes: usize,
}

impl Default for WatchSettings {
    fn default() -> WatchSettings {
        WatchSettings {
            retention: std::time::Duration::from_secs(600),
            retention_bytes: 256 << 20,
            queue_bytes: 8 << 20,
        }
    }
}
