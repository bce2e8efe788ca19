//! Long-running operations recorded in the directory: splits, merges and
//! replica moves.
//!
//! An [`Operation`] is the durable memory of a multi-step change: every phase
//! transition is a metadata Raft entry, so whichever node leads the metadata
//! group next can read where the operation stands and resume it. Transitions
//! are compare-and-set on the phase (`from` must match), which makes every
//! step idempotent and lets two would-be drivers race harmlessly.
//!
//! Phases of a split (see `split-protocol.md`):
//! `Planned → Created → Capturing → Frozen → Committed → Done`, or
//! `Aborted` from any phase before `Committed`. Commit is the point of no
//! return: it rewrites the directory's ranges in the same entry.
//!
//! Phases of a merge (`docs/plans/merge.md`): the split's, run backwards
//! into a shard that already exists: `Planned → Created` (the left shard
//! is ready to absorb the right range) `→ Capturing → Frozen → Committed →
//! Done`, or `Aborted` before `Committed`: the right range's shard is
//! captured into the left range's, frozen, verified, and the commit joins
//! the two ranges in one entry.
//!
//! Phases of a replica move (learner first, then joint consensus, as in TiKV
//! and CockroachDB): `Planned → Created → Learning → Joint → Committed → Done`.
//! The new replica gets a fresh replica id (member ids are never reused), is
//! created empty on the target node, added to the group as a learner and
//! caught up by log or snapshot; then the group enters the joint
//! configuration `{old} ∧ {new}` and flattens it to `{new}`. `Joint` is the
//! point of no return (a move is only aborted before it); `Committed` records
//! the new replica set in the directory; `Done` means the source replica's
//! data is gone.

use serde::{Deserialize, Serialize};

use crate::range::{RangeDescriptor, Replica};
use crate::{RangeId, ShardId};

pub type OpId = u64;

/// Where an operation stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Recorded; the range is busy; the new shard's replicas are chosen.
    Planned,
    /// The new shard's replicas exist (empty, refusing clients).
    Created,
    /// The old shard forwards writes to the new one; backfill and catch-up run.
    Capturing,
    /// The old shard refuses writes to the moving range; verify, then commit.
    Frozen,
    /// A move's new replica is a learner of the group, catching up.
    Learning,
    /// A move's group is in (or entering) the joint configuration; it can
    /// only go forward from here.
    Joint,
    /// The directory says the new shard owns the moving range.
    Committed,
    /// Activated and cleaned up.
    Done,
    /// Abandoned before commit; nothing moved.
    Aborted,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Done | Phase::Aborted)
    }
}

/// What an operation does.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Range `range_id` of shard `source` split at `split_key`: the keys from
    /// `split_key` on move to the new shard `target` as range `new_range_id`.
    Split {
        range_id: RangeId,
        split_key: String,
        source: ShardId,
        target: ShardId,
        new_range_id: RangeId,
        target_replicas: Vec<Replica>,
        /// Why it was started: "admin", "size" or "load".
        reason: String,
    },
    /// Range `right_range` (of shard `right`) is merged into its left-hand
    /// neighbour `left_range` (of shard `left`): one range of `left` at a
    /// bumped epoch, and `right`'s replicas (`right_replicas`) destroyed.
    Merge {
        left_range: RangeId,
        right_range: RangeId,
        left: ShardId,
        right: ShardId,
        right_replicas: Vec<Replica>,
        /// Why it was started: "admin" or "size".
        reason: String,
        /// The timestamp of the right shard's freeze, recorded at commit:
        /// the merged range's changes up to it went with the right shard
        /// (what the left one is told when it absorbs the range).
        #[serde(default)]
        frozen_ts: u64,
        /// The merged range, recorded at commit: what the cutover hands the
        /// two shards (never read from a directory that may lag behind it).
        #[serde(default)]
        merged: Option<RangeDescriptor>,
    },
    /// Group `shard_id`'s replica `from` (on node `from.node_id`) is replaced
    /// by the new replica `to`.
    Move {
        shard_id: ShardId,
        from: Replica,
        to: Replica,
        /// Why it was started: "admin", "heal", "decommission" or "balance".
        reason: String,
    },
}

impl OpKind {
    /// The groups the operation changes: no other operation may touch them
    /// while it runs.
    pub fn groups(&self) -> Vec<ShardId> {
        match self {
            OpKind::Split { source, target, .. } => vec![*source, *target],
            OpKind::Merge { left, right, .. } => vec![*left, *right],
            OpKind::Move { shard_id, .. } => vec![*shard_id],
        }
    }

    /// A replica the operation is creating: `(group, replica)`.
    pub fn new_replicas(&self) -> Vec<(ShardId, Replica)> {
        match self {
            OpKind::Split { target, target_replicas, .. } => {
                target_replicas.iter().map(|r| (*target, r.clone())).collect()
            }
            OpKind::Move { shard_id, to, .. } => vec![(*shard_id, to.clone())],
            OpKind::Merge { .. } => Vec::new(),
        }
    }

    /// The replicas the operation needs besides those the directory's
    /// shards list: the ones it creates ([`OpKind::new_replicas`]) and a
    /// merge's right shard, which leaves `shards` at the commit but is
    /// needed (and routed to) until the cutover is over.
    pub fn needed_replicas(&self) -> Vec<(ShardId, Replica)> {
        match self {
            OpKind::Merge { right, right_replicas, .. } => right_replicas.iter().map(|r| (*right, r.clone())).collect(),
            _ => self.new_replicas(),
        }
    }

    /// "split", "merge" or "move".
    pub fn name(&self) -> &'static str {
        match self {
            OpKind::Split { .. } => "split",
            OpKind::Merge { .. } => "merge",
            OpKind::Move { .. } => "move",
        }
    }
}

/// Copy progress reported by the source shard's leader.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Progress {
    pub keys_copied: u64,
    pub bytes_copied: u64,
    pub keys_total: u64,
    pub bytes_total: u64,
    /// Forwarded writes not yet applied by the target (a split), or log
    /// entries the new replica still lacks (a move).
    pub forward_backlog: u64,
}

/// A recorded operation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    pub op_id: OpId,
    pub kind: OpKind,
    pub phase: Phase,
    /// `(phase, wall-clock ms)` of every phase entered, in order. The time is
    /// the proposer's clock, carried in the command, so applying stays
    /// deterministic.
    pub history: Vec<(Phase, u64)>,
    pub progress: Progress,
    /// Freeze to activation as measured by the driver, once known.
    pub write_pause_ms: Option<u64>,
    pub error: Option<String>,
    /// For aborted operations: the leftovers (capture, new shard) are gone.
    #[serde(default)]
    pub cleaned: bool,
}

impl Operation {
    /// When the operation entered `phase`, if it did.
    pub fn entered(&self, phase: Phase) -> Option<u64> {
        self.history.iter().find(|(p, _)| *p == phase).map(|(_, t)| *t)
    }
}
