//! Ranges, shards and replicas: the descriptors the directory is made of.
//!
//! A [`RangeDescriptor`] says that the keys `[start, end)` belong to one shard
//! at one `epoch`. The epoch grows every time the range's bounds or owner
//! change (a split bumps it), so a request stamped with an old epoch can be
//! recognised and refused by the shard that applies it. `end == None` means
//! +∞. All ranges together must tile the key space: the first starts at `""`,
//! each ends where the next starts, and the last is unbounded.

use serde::{Deserialize, Serialize};

use crate::{NodeId, RangeId, ReplicaId, ShardId};

/// Whether a range is free or held by a running operation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RangeState {
    #[default]
    Active,
    /// An operation (e.g. a split) holds the range; no other may start.
    Busy { op_id: u64 },
}

/// `[start, end)` → shard, at an epoch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RangeDescriptor {
    pub range_id: RangeId,
    pub start: String,
    /// Exclusive end; `None` is +∞.
    pub end: Option<String>,
    pub shard_id: ShardId,
    pub epoch: u64,
    #[serde(default)]
    pub state: RangeState,
}

impl RangeDescriptor {
    /// Whether `key` falls inside `[start, end)`.
    pub fn contains(&self, key: &str) -> bool {
        key >= self.start.as_str() && self.end.as_deref().is_none_or(|end| key < end)
    }

    /// Whether this range intersects `[start, end)` (`end == None` is +∞).
    pub fn overlaps(&self, start: &str, end: Option<&str>) -> bool {
        let starts_before_end = end.is_none_or(|e| self.start.as_str() < e);
        let ends_after_start = self.end.as_deref().is_none_or(|e| e > start);
        starts_before_end && ends_after_start
    }
}

/// One member of a Raft group: a replica id on a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Replica {
    pub replica_id: ReplicaId,
    pub node_id: NodeId,
}

/// A shard (Raft group) and where its replicas live.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ShardDescriptor {
    pub shard_id: ShardId,
    pub replicas: Vec<Replica>,
    /// Grows with every membership change.
    pub conf_version: u64,
}

impl ShardDescriptor {
    /// The replica of this shard hosted on `node`, if any.
    pub fn replica_on(&self, node: NodeId) -> Option<&Replica> {
        self.replicas.iter().find(|r| r.node_id == node)
    }

    /// The node that hosts replica `replica_id`, if it is a member.
    pub fn node_of(&self, replica_id: ReplicaId) -> Option<NodeId> {
        self.replicas.iter().find(|r| r.replica_id == replica_id).map(|r| r.node_id)
    }
}

/// Checks that `ranges`, sorted by start, tile the key space exactly.
/// Returns a description of the first defect found.
pub fn check_tiling<'a>(ranges: impl IntoIterator<Item = &'a RangeDescriptor>) -> Result<(), String> {
    let mut expected_start: Option<&str> = Some("");
    for r in ranges {
        match expected_start {
            None => return Err(format!("range {} starts after the unbounded range", r.range_id)),
            Some(s) if s != r.start => {
                return Err(format!("range {} starts at {:?}, expected {:?}", r.range_id, r.start, s))
            }
            Some(_) => {}
        }
        if let Some(end) = &r.end {
            if end.as_str() <= r.start.as_str() {
                return Err(format!("range {} is empty or inverted", r.range_id));
            }
        }
        expected_start = r.end.as_deref();
    }
    match expected_start {
        None => Ok(()),
        Some(s) => Err(format!("key space not covered from {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: u64, start: &str, end: Option<&str>) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start: start.into(),
            end: end.map(Into::into),
            shard_id: 1,
            epoch: 1,
            state: RangeState::Active,
        }
    }

    #[test]
    fn contains_is_half_open() {
        let d = r(1, "b", Some("d"));
        assert!(!d.contains("a"));
        assert!(d.contains("b"));
        assert!(d.contains("c\u{10ffff}"));
        assert!(!d.contains("d"));
        assert!(r(2, "d", None).contains("zzzz"));
        assert!(r(3, "", Some("a")).contains(""));
    }

    #[test]
    fn overlaps_handles_unbounded_ends() {
        let d = r(1, "b", Some("d"));
        assert!(d.overlaps("a", Some("c")));
        assert!(d.overlaps("c", None));
        assert!(!d.overlaps("d", None));
        assert!(!d.overlaps("a", Some("b")));
        assert!(r(2, "d", None).overlaps("x", Some("y")));
    }

    #[test]
    fn tiling_detects_gaps_overlaps_and_open_ends() {
        assert!(check_tiling(&[r(1, "", None)]).is_ok());
        assert!(check_tiling(&[r(1, "", Some("m")), r(2, "m", None)]).is_ok());
        assert!(check_tiling(&[r(1, "", Some("m")), r(2, "n", None)]).is_err());
        assert!(check_tiling(&[r(1, "", Some("m"))]).is_err());
        assert!(check_tiling(&[r(1, "a", None)]).is_err());
        assert!(check_tiling(&[r(1, "", None), r(2, "m", None)]).is_err());
        assert!(check_tiling(&[r(1, "", Some("")), r(2, "", None)]).is_err());
    }
}
