//! The directory: which nodes exist, which shard owns which key range, and
//! where each shard's replicas live.
//!
//! The metadata Raft group replicates a [`Directory`] by applying the same
//! [`MetaCommand`]s in the same order on every replica, so `apply` must be
//! deterministic: no clocks, no randomness, no I/O. Liveness (heartbeats) is
//! deliberately *not* here: it changes every second and is kept in the
//! metadata leader's memory instead of being written through Raft.
//!
//! Routers and clients hold a copy of the directory as a cache; `version`
//! grows with every applied change so a cache can tell which copy is newer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::range::{check_tiling, RangeDescriptor, RangeState, Replica, ShardDescriptor};
use crate::{NodeId, RangeId, ShardId, META_GROUP};

/// Lifecycle state of a node, as recorded in the directory.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    #[default]
    Active,
    Decommissioning,
    Removed,
}

/// A node and its addresses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeDescriptor {
    pub id: NodeId,
    /// Internal RPC address (Raft traffic, forwarding).
    pub raft_addr: String,
    /// HTTP API address, once the node has reported it.
    pub api_addr: Option<String>,
    pub state: NodeState,
}

/// A change to the directory, proposed through the metadata Raft group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum MetaCommand {
    /// Add a node (allocating an id when `node_id` is `None`) or update the
    /// addresses of a known one.
    RegisterNode { node_id: Option<NodeId>, raft_addr: String, api_addr: Option<String> },
}

/// What applying a [`MetaCommand`] produced.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum MetaResponse {
    Node(NodeId),
}

/// Why a [`MetaCommand`] was refused. Refusals are deterministic, so every
/// replica refuses the same command the same way.
#[derive(thiserror::Error, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum MetaError {
    #[error("node {0} was removed from the cluster and cannot rejoin under that id")]
    NodeRemoved(NodeId),
    #[error("raft address {addr} already belongs to node {node}")]
    AddressInUse { addr: String, node: NodeId },
}

/// The replicated directory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Directory {
    /// Grows with every applied change.
    pub version: u64,
    pub nodes: BTreeMap<NodeId, NodeDescriptor>,
    /// The metadata group's own replicas (group 0).
    pub meta: Option<ShardDescriptor>,
    /// Data shards by id.
    pub shards: BTreeMap<ShardId, ShardDescriptor>,
    /// Ranges keyed by their start key; they tile the key space.
    pub ranges: BTreeMap<String, RangeDescriptor>,
    pub next_node_id: NodeId,
    pub next_shard_id: ShardId,
    pub next_range_id: RangeId,
    pub next_replica_id: u64,
}

impl Directory {
    /// The directory of a brand-new cluster: every initial node registered,
    /// the metadata group and shard 1 (owning `["", +∞)`) each replicated on
    /// the first `replication` nodes by id. Every founding node computes the
    /// same value from the same `--initial-cluster` list.
    pub fn bootstrap(initial: &[(NodeId, String)], replication: usize) -> Directory {
        let mut d =
            Directory { version: 1, next_shard_id: 1, next_range_id: 1, next_replica_id: 1, ..Default::default() };
        let mut sorted: Vec<_> = initial.to_vec();
        sorted.sort();
        for (id, addr) in &sorted {
            d.nodes.insert(
                *id,
                NodeDescriptor { id: *id, raft_addr: addr.clone(), api_addr: None, state: NodeState::Active },
            );
        }
        d.next_node_id = sorted.last().map_or(1, |(id, _)| id + 1);
        let founders: Vec<NodeId> = sorted.iter().take(replication.max(1)).map(|(id, _)| *id).collect();
        d.meta = Some(d.new_group(META_GROUP, &founders));
        let shard_id = d.alloc_shard_id();
        let shard = d.new_group(shard_id, &founders);
        d.shards.insert(shard_id, shard);
        let range_id = d.alloc_range_id();
        d.ranges.insert(
            String::new(),
            RangeDescriptor {
                range_id,
                start: String::new(),
                end: None,
                shard_id,
                epoch: 1,
                state: RangeState::Active,
            },
        );
        d
    }

    fn new_group(&mut self, shard_id: ShardId, nodes: &[NodeId]) -> ShardDescriptor {
        let replicas = nodes.iter().map(|&node_id| Replica { replica_id: self.alloc_replica_id(), node_id }).collect();
        ShardDescriptor { shard_id, replicas, conf_version: 1 }
    }

    fn alloc_replica_id(&mut self) -> u64 {
        let id = self.next_replica_id;
        self.next_replica_id += 1;
        id
    }

    fn alloc_shard_id(&mut self) -> ShardId {
        let id = self.next_shard_id;
        self.next_shard_id += 1;
        id
    }

    fn alloc_range_id(&mut self) -> RangeId {
        let id = self.next_range_id;
        self.next_range_id += 1;
        id
    }

    /// The range that owns `key`. Total because ranges tile the key space;
    /// `None` only for an uninitialised directory.
    pub fn lookup(&self, key: &str) -> Option<&RangeDescriptor> {
        self.ranges
            .range::<str, _>((std::ops::Bound::Unbounded, std::ops::Bound::Included(key)))
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| r.contains(key))
    }

    /// Ranges intersecting `[start, end)` in key order (`end == None` is +∞).
    pub fn ranges_between<'a>(
        &'a self,
        start: &'a str,
        end: Option<&'a str>,
    ) -> impl Iterator<Item = &'a RangeDescriptor> + 'a {
        let first = self.lookup(start).map(|r| r.start.clone()).unwrap_or_default();
        self.ranges.range(first..).map(|(_, r)| r).take_while(move |r| r.overlaps(start, end))
    }

    /// A range by id.
    pub fn range(&self, id: RangeId) -> Option<&RangeDescriptor> {
        self.ranges.values().find(|r| r.range_id == id)
    }

    /// Ranges owned by `shard`, in key order.
    pub fn ranges_of(&self, shard: ShardId) -> Vec<RangeDescriptor> {
        self.ranges.values().filter(|r| r.shard_id == shard).cloned().collect()
    }

    /// A group's descriptor: the metadata group for [`META_GROUP`], else a shard.
    pub fn group(&self, id: ShardId) -> Option<&ShardDescriptor> {
        if id == META_GROUP {
            self.meta.as_ref()
        } else {
            self.shards.get(&id)
        }
    }

    /// Every group (metadata group first) with a replica on `node`.
    pub fn groups_on(&self, node: NodeId) -> impl Iterator<Item = &ShardDescriptor> {
        self.meta.iter().chain(self.shards.values()).filter(move |g| g.replica_on(node).is_some())
    }

    /// Checks the structural invariants: ranges tile the key space and every
    /// range's shard exists.
    pub fn check(&self) -> Result<(), String> {
        check_tiling(self.ranges.values())?;
        for r in self.ranges.values() {
            if !self.shards.contains_key(&r.shard_id) {
                return Err(format!("range {} points at missing shard {}", r.range_id, r.shard_id));
            }
        }
        Ok(())
    }

    /// Applies one command. Deterministic; on error nothing changes.
    pub fn apply(&mut self, cmd: &MetaCommand) -> Result<MetaResponse, MetaError> {
        let resp = match cmd {
            MetaCommand::RegisterNode { node_id, raft_addr, api_addr } => {
                if let Some(other) = self.nodes.values().find(|n| &n.raft_addr == raft_addr && Some(n.id) != *node_id) {
                    if other.state != NodeState::Removed {
                        return Err(MetaError::AddressInUse { addr: raft_addr.clone(), node: other.id });
                    }
                }
                let id = match node_id {
                    Some(id) => *id,
                    None => {
                        let id = self.next_node_id;
                        self.next_node_id += 1;
                        id
                    }
                };
                match self.nodes.get_mut(&id) {
                    Some(n) if n.state == NodeState::Removed => return Err(MetaError::NodeRemoved(id)),
                    Some(n) => {
                        n.raft_addr = raft_addr.clone();
                        if api_addr.is_some() {
                            n.api_addr = api_addr.clone();
                        }
                    }
                    None => {
                        self.next_node_id = self.next_node_id.max(id + 1);
                        self.nodes.insert(
                            id,
                            NodeDescriptor {
                                id,
                                raft_addr: raft_addr.clone(),
                                api_addr: api_addr.clone(),
                                state: NodeState::Active,
                            },
                        );
                    }
                }
                MetaResponse::Node(id)
            }
        };
        self.version += 1;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn three() -> Directory {
        Directory::bootstrap(&[(1, "a:1".into()), (2, "a:2".into()), (3, "a:3".into())], 3)
    }

    #[test]
    fn bootstrap_has_one_range_over_everything() {
        let d = three();
        d.check().unwrap();
        assert_eq!(d.ranges.len(), 1);
        let r = d.lookup("").unwrap();
        assert_eq!((r.start.as_str(), r.end.as_deref(), r.shard_id, r.epoch), ("", None, 1, 1));
        assert_eq!(d.lookup("\u{10ffff}").unwrap().range_id, r.range_id);
        assert_eq!(d.meta.as_ref().unwrap().replicas.len(), 3);
        assert_eq!(d.shards[&1].replicas.len(), 3);
    }

    #[test]
    fn replica_ids_are_unique_across_groups() {
        let d = Directory::bootstrap(&[(5, "x".into()), (2, "y".into()), (9, "z".into()), (1, "w".into())], 3);
        let mut ids: Vec<_> = d
            .groups_on(1)
            .chain(d.groups_on(2))
            .chain(d.groups_on(5))
            .flat_map(|g| g.replicas.clone())
            .map(|r| r.replica_id)
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 6, "3 meta + 3 shard replicas, all distinct");
        // founders are the three lowest ids
        assert!(d.groups_on(9).next().is_none());
        assert_eq!(d.next_node_id, 10);
    }

    #[test]
    fn register_node_allocates_and_updates() {
        let mut d = three();
        let v = d.version;
        let r = d.apply(&MetaCommand::RegisterNode {
            node_id: None,
            raft_addr: "a:4".into(),
            api_addr: Some("h:4".into()),
        });
        assert_eq!(r, Ok(MetaResponse::Node(4)));
        assert_eq!(d.version, v + 1);
        let r = d.apply(&MetaCommand::RegisterNode {
            node_id: Some(2),
            raft_addr: "a:22".into(),
            api_addr: Some("h:2".into()),
        });
        assert_eq!(r, Ok(MetaResponse::Node(2)));
        assert_eq!(d.nodes[&2].raft_addr, "a:22");
        assert_eq!(d.nodes[&2].api_addr.as_deref(), Some("h:2"));
        let clash = d.apply(&MetaCommand::RegisterNode { node_id: None, raft_addr: "a:22".into(), api_addr: None });
        assert_eq!(clash, Err(MetaError::AddressInUse { addr: "a:22".into(), node: 2 }));
    }

    fn split_dir(points: &[String]) -> Directory {
        // Build a tiled directory by hand from sorted distinct split points.
        let mut d = three();
        let mut starts = vec![String::new()];
        starts.extend(points.iter().cloned());
        d.ranges.clear();
        for (i, s) in starts.iter().enumerate() {
            let end = starts.get(i + 1).cloned();
            d.ranges.insert(
                s.clone(),
                RangeDescriptor {
                    range_id: i as u64 + 1,
                    start: s.clone(),
                    end,
                    shard_id: 1,
                    epoch: 1,
                    state: RangeState::Active,
                },
            );
        }
        d
    }

    proptest! {
        #[test]
        fn lookup_finds_the_unique_owner(mut points in proptest::collection::btree_set("[a-z]{1,4}", 0..12), key in "[a-z]{0,5}") {
            points.remove("");
            let points: Vec<String> = points.into_iter().collect();
            let d = split_dir(&points);
            d.check().unwrap();
            let owners: Vec<_> = d.ranges.values().filter(|r| r.contains(&key)).collect();
            prop_assert_eq!(owners.len(), 1);
            prop_assert_eq!(d.lookup(&key).unwrap().range_id, owners[0].range_id);
            // every split point is owned by the range that starts there
            for p in &points {
                prop_assert_eq!(&d.lookup(p).unwrap().start, p);
            }
        }

        #[test]
        fn ranges_between_is_exact(points in proptest::collection::btree_set("[a-z]{1,3}", 0..10), a in "[a-z]{0,3}", b in "[a-z]{0,3}") {
            let points: Vec<String> = points.into_iter().collect();
            let d = split_dir(&points);
            let (s, e) = if a <= b { (a, b) } else { (b, a) };
            let got: Vec<_> = d.ranges_between(&s, Some(&e)).map(|r| r.range_id).collect();
            let want: Vec<_> = d.ranges.values().filter(|r| r.overlaps(&s, Some(&e))).map(|r| r.range_id).collect();
            prop_assert_eq!(got, want);
            let all: Vec<_> = d.ranges_between(&s, None).map(|r| r.range_id).collect();
            let want_all: Vec<_> = d.ranges.values().filter(|r| r.overlaps(&s, None)).map(|r| r.range_id).collect();
            prop_assert_eq!(all, want_all);
        }
    }
}
