//! Long-running operations recorded in the directory (splits for now).
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

use serde::{Deserialize, Serialize};

use crate::range::Replica;
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
}

/// Copy progress reported by the source shard's leader.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Progress {
    pub keys_copied: u64,
    pub bytes_copied: u64,
    pub keys_total: u64,
    pub bytes_total: u64,
    /// Forwarded writes not yet applied by the target.
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
