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

use crate::operation::{OpId, OpKind, Operation, Phase, Progress};
use crate::range::{check_tiling, RangeDescriptor, RangeState, Replica, ShardDescriptor};
use crate::{NodeId, RangeId, ShardId, META_GROUP};

/// Finished operations kept for `GET /admin/operations`.
const KEEP_FINISHED_OPS: usize = 200;

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
    /// Start splitting `range_id` at `split_key`, placing the new shard's
    /// replicas on `target_nodes`. Marks the range busy.
    PlanSplit { range_id: RangeId, split_key: String, target_nodes: Vec<NodeId>, reason: String, now_ms: u64 },
    /// Move an operation from phase `from` to `to` (compare-and-set).
    AdvanceOp { op_id: OpId, from: Phase, to: Phase, now_ms: u64 },
    /// Record copy progress.
    ReportProgress { op_id: OpId, progress: Progress },
    /// The commit point of a split: the moving range now belongs to the new shard.
    CommitSplit { op_id: OpId, now_ms: u64 },
    /// Declare a hash-spread keyspace: keys under `prefix` are mapped to
    /// their buckets from now on. Declaring the same again changes nothing.
    DeclareKeyspace { prefix: String, buckets: u32 },
    /// A declared keyspace's buckets are ranges of their own and nothing is
    /// left under a plain key: the declaration is over.
    ActivateKeyspace { prefix: String },
    /// Start merging `range_id` with its right-hand neighbour. Marks both
    /// ranges busy.
    PlanMerge { range_id: RangeId, reason: String, now_ms: u64 },
    /// The commit point of a merge: the two ranges are one, of the left
    /// one's shard, at an epoch above both; the right one's shard is gone.
    CommitMerge { op_id: OpId, now_ms: u64, frozen_ts: u64 },
    /// Start moving group `shard_id`'s replica on `from_node` to `to_node`
    /// (a new replica id is allocated). The group is busy until it ends.
    PlanMove { shard_id: ShardId, from_node: NodeId, to_node: NodeId, reason: String, now_ms: u64 },
    /// A move's group has flattened its joint configuration: record the new
    /// replica set.
    CommitMove { op_id: OpId, now_ms: u64 },
    /// Change a node's lifecycle state (decommission, recommission, remove).
    SetNodeState { node_id: NodeId, state: NodeState },
    /// Abandon an operation that has not committed. A move in `Joint` is
    /// abandoned only with `learner_only`: its driver observed that the
    /// group never entered the joint configuration (the new replica is
    /// still only a learner), so reverting it is safe; without it `Joint`
    /// is past the point of no return.
    AbortOp {
        op_id: OpId,
        reason: String,
        now_ms: u64,
        #[serde(default)]
        learner_only: bool,
    },
    /// A committed operation finished; `write_pause_ms` as measured by the driver.
    FinishOp { op_id: OpId, write_pause_ms: Option<u64>, now_ms: u64 },
    /// An aborted operation's leftovers are gone.
    MarkCleaned { op_id: OpId },
    /// A new node joins (`cleave-node --join`): like `RegisterNode`, but an
    /// id that is already taken is refused, so a wiped node cannot take
    /// over an active node's identity and inherit its replicas on paper.
    JoinNode { node_id: Option<NodeId>, raft_addr: String, api_addr: Option<String> },
}

/// What applying a [`MetaCommand`] produced.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum MetaResponse {
    Node(NodeId),
    Op(OpId),
    Done,
}

/// Why a [`MetaCommand`] was refused. Refusals are deterministic, so every
/// replica refuses the same command the same way.
#[derive(thiserror::Error, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum MetaError {
    #[error("node {0} was removed from the cluster and cannot rejoin under that id")]
    NodeRemoved(NodeId),
    #[error("raft address {addr} already belongs to node {node}")]
    AddressInUse { addr: String, node: NodeId },
    #[error("no range {0}")]
    UnknownRange(RangeId),
    #[error("range {range_id} is busy with operation {op_id}")]
    RangeBusy { range_id: RangeId, op_id: OpId },
    #[error("range {0} is the last range: it has no right-hand neighbour to merge with")]
    LastRange(RangeId),
    #[error("range {range_id} and its right-hand neighbour are both of shard {shard_id} already")]
    OneShard { range_id: RangeId, shard_id: ShardId },
    /// A merge that would join two buckets of a hash-spread keyspace (or a
    /// bucket and keys outside it), or a range that shares its shard.
    #[error("range {range_id} cannot merge with its right-hand neighbour: {why}")]
    BadMerge { range_id: RangeId, why: String },
    #[error("split key {key:?} is not strictly inside range {range_id}")]
    BadSplitKey { range_id: RangeId, key: String },
    #[error("cannot place replicas: {0}")]
    BadPlacement(String),
    #[error("no operation {0}")]
    UnknownOp(OpId),
    #[error("operation {op_id} is {current:?}, not {expected:?}")]
    WrongPhase { op_id: OpId, current: Phase, expected: Phase },
    #[error("operation {0} is past its point of no return and can no longer be aborted")]
    AlreadyCommitted(OpId),
    #[error("no shard {0}")]
    UnknownShard(ShardId),
    #[error("no keyspace {0:?}")]
    UnknownKeyspace(String),
    #[error(transparent)]
    Keyspace(#[from] crate::keyspace::KeyspaceError),
    #[error("no node {0}")]
    UnknownNode(NodeId),
    #[error("shard {shard_id} is busy with operation {op_id}")]
    ShardBusy { shard_id: ShardId, op_id: OpId },
    #[error("cannot move: {0}")]
    BadMove(String),
    #[error("node {node}: {msg}")]
    BadNodeState { node: NodeId, msg: String },
    #[error("node {0} already belongs to the cluster; a joining node needs a new id")]
    NodeExists(NodeId),
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
    /// Running and recently finished operations.
    #[serde(default)]
    pub ops: BTreeMap<OpId, Operation>,
    #[serde(default)]
    pub next_op_id: OpId,
    /// Hash-spread keyspaces ([`crate::keyspace`]).
    #[serde(default)]
    pub keyspaces: crate::keyspace::Keyspaces,
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

    /// The replicas of a group, including a shard still being created by a
    /// running split (not yet in `shards`), a running move's new replica and
    /// a merge's right shard until the merge is over.
    pub fn group_replicas(&self, id: ShardId) -> Option<Vec<Replica>> {
        let mut out = self.group(id).map(|g| g.replicas.clone());
        // A merge's right shard stays routable after the merge, for as long
        // as the operation is remembered: watches behind the merge read its
        // change log while it lives (it is deleted shortly after).
        let merged = |op: &&Operation| matches!(op.kind, OpKind::Merge { .. }) && op.phase == Phase::Done;
        for op in self.ops.values().filter(|op| !op.phase.is_terminal() || merged(op)) {
            for (group, r) in op.kind.needed_replicas() {
                if group == id {
                    let v = out.get_or_insert_with(Vec::new);
                    if !v.contains(&r) {
                        v.push(r);
                    }
                }
            }
        }
        out
    }

    /// Whether `node` should host a replica of `group`: the directory lists
    /// one there, or an unfinished operation is creating one there. A node
    /// holding a replica for which this is false may delete it.
    pub fn expects_replica(&self, node: NodeId, group: ShardId) -> bool {
        self.group(group).is_some_and(|g| g.replica_on(node).is_some())
            || self
                .active_ops()
                .filter(|op| op.phase != Phase::Aborted)
                .flat_map(|op| op.kind.needed_replicas())
                .any(|(g, r)| g == group && r.node_id == node)
    }

    /// Nodes for the `count` replicas of a new group: active nodes that are
    /// `live` (heard from recently), fewest replicas first. A node that is
    /// down cannot create its replica, so placing one there only makes the
    /// operation wait out its setup deadline and abort: with too few live
    /// nodes the placement is refused instead.
    pub fn place_new_group(&self, live: &[NodeId], count: usize) -> Result<Vec<NodeId>, MetaError> {
        let mut candidates: Vec<(usize, NodeId)> = self
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Active && live.contains(&n.id))
            .map(|n| (self.replica_count(n.id), n.id))
            .collect();
        if candidates.len() < count {
            return Err(MetaError::BadPlacement(format!(
                "a new shard needs {count} live active nodes for its replicas, and {} are live",
                candidates.len()
            )));
        }
        candidates.sort();
        Ok(candidates.into_iter().take(count).map(|(_, id)| id).collect())
    }

    /// Replicas on `node`: listed in the directory plus those unfinished
    /// operations are creating there.
    pub fn replica_count(&self, node: NodeId) -> usize {
        let pending = self
            .ops
            .values()
            .filter(|op| !op.phase.is_terminal() && op.phase != Phase::Committed)
            .flat_map(|op| op.kind.new_replicas())
            .filter(|(g, r)| r.node_id == node && self.group(*g).is_none_or(|d| d.replica_on(node).is_none()))
            .count();
        self.groups_on(node).count() + pending
    }

    /// The unfinished operation holding `group`, if any.
    pub fn group_busy(&self, group: ShardId) -> Option<OpId> {
        self.active_ops().find(|op| op.kind.groups().contains(&group)).map(|op| op.op_id)
    }

    /// The range with id `id`, by its start key.
    fn range_start(&self, id: RangeId) -> Option<String> {
        self.ranges.values().find(|r| r.range_id == id).map(|r| r.start.clone())
    }

    fn op_mut(&mut self, op_id: OpId) -> Result<&mut Operation, MetaError> {
        self.ops.get_mut(&op_id).ok_or(MetaError::UnknownOp(op_id))
    }

    /// Operations that still need a driver: not terminal, or aborted with
    /// leftovers to clean.
    pub fn active_ops(&self) -> impl Iterator<Item = &Operation> {
        self.ops.values().filter(|op| !op.phase.is_terminal() || (op.phase == Phase::Aborted && !op.cleaned))
    }

    fn prune_ops(&mut self) {
        let finished: Vec<OpId> = self
            .ops
            .values()
            .filter(|o| o.phase.is_terminal() && (o.phase == Phase::Done || o.cleaned))
            .map(|o| o.op_id)
            .collect();
        if finished.len() > KEEP_FINISHED_OPS {
            for id in &finished[..finished.len() - KEEP_FINISHED_OPS] {
                self.ops.remove(id);
            }
        }
    }

    fn plan_split(
        &mut self,
        range_id: RangeId,
        split_key: &str,
        target_nodes: &[NodeId],
        reason: &str,
        now_ms: u64,
    ) -> Result<OpId, MetaError> {
        let start = self.range_start(range_id).ok_or(MetaError::UnknownRange(range_id))?;
        let range = &self.ranges[&start];
        if let RangeState::Busy { op_id } = range.state {
            return Err(MetaError::RangeBusy { range_id, op_id });
        }
        let inside = split_key > range.start.as_str() && range.end.as_deref().is_none_or(|e| split_key < e);
        if !inside {
            return Err(MetaError::BadSplitKey { range_id, key: split_key.to_string() });
        }
        let mut seen = std::collections::BTreeSet::new();
        if target_nodes.is_empty() || !target_nodes.iter().all(|n| seen.insert(*n)) {
            return Err(MetaError::BadPlacement("need distinct target nodes".into()));
        }
        for n in target_nodes {
            match self.nodes.get(n) {
                Some(d) if d.state == NodeState::Active => {}
                _ => return Err(MetaError::BadPlacement(format!("node {n} is not an active node"))),
            }
        }
        let source = range.shard_id;
        if let Some(op_id) = self.group_busy(source) {
            return Err(MetaError::ShardBusy { shard_id: source, op_id });
        }
        let op_id = self.next_op_id.max(1);
        let target = self.alloc_shard_id();
        let new_range_id = self.alloc_range_id();
        let target_replicas =
            target_nodes.iter().map(|&node_id| Replica { replica_id: self.alloc_replica_id(), node_id }).collect();
        self.ranges.get_mut(&start).expect("range").state = RangeState::Busy { op_id };
        let kind = OpKind::Split {
            range_id,
            split_key: split_key.to_string(),
            source,
            target,
            new_range_id,
            target_replicas,
            reason: reason.to_string(),
        };
        let created = self.new_op(kind, now_ms);
        debug_assert_eq!(created, op_id);
        Ok(op_id)
    }

    fn advance(&mut self, op_id: OpId, from: Phase, to: Phase, now_ms: u64) -> Result<(), MetaError> {
        let op = self.op_mut(op_id)?;
        let allowed = match op.kind {
            OpKind::Split { .. } => matches!(
                (from, to),
                (Phase::Planned, Phase::Created)
                    | (Phase::Created, Phase::Capturing)
                    | (Phase::Capturing, Phase::Frozen)
                    | (Phase::Committed, Phase::Done)
            ),
            // `Created`: the left shard is ready to absorb the right range.
            OpKind::Merge { .. } => matches!(
                (from, to),
                (Phase::Planned, Phase::Created)
                    | (Phase::Created, Phase::Capturing)
                    | (Phase::Capturing, Phase::Frozen)
                    | (Phase::Committed, Phase::Done)
            ),
            OpKind::Move { .. } => matches!(
                (from, to),
                (Phase::Planned, Phase::Created)
                    | (Phase::Created, Phase::Learning)
                    | (Phase::Learning, Phase::Joint)
                    | (Phase::Committed, Phase::Done)
            ),
        };
        if op.phase == to {
            return Ok(());
        }
        if !allowed || op.phase != from {
            return Err(MetaError::WrongPhase { op_id, current: op.phase, expected: from });
        }
        op.phase = to;
        op.history.push((to, now_ms));
        Ok(())
    }

    /// The kind of operation `op_id`, about to commit from phase `from`;
    /// `None` when it has committed already (committing again changes
    /// nothing).
    fn committing(&self, op_id: OpId, from: Phase) -> Result<Option<OpKind>, MetaError> {
        let op = self.ops.get(&op_id).ok_or(MetaError::UnknownOp(op_id))?;
        match op.phase {
            Phase::Committed | Phase::Done => Ok(None),
            p if p == from => Ok(Some(op.kind.clone())),
            current => Err(MetaError::WrongPhase { op_id, current, expected: from }),
        }
    }

    fn mark_committed(&mut self, op_id: OpId, now_ms: u64) -> Result<(), MetaError> {
        let op = self.op_mut(op_id)?;
        op.phase = Phase::Committed;
        op.history.push((Phase::Committed, now_ms));
        Ok(())
    }

    fn commit_split(&mut self, op_id: OpId, now_ms: u64) -> Result<(), MetaError> {
        let Some(kind) = self.committing(op_id, Phase::Frozen)? else { return Ok(()) };
        let OpKind::Split { range_id, split_key, target, new_range_id, target_replicas, .. } = kind else {
            return Err(MetaError::UnknownOp(op_id));
        };
        let start = self.range_start(range_id).ok_or(MetaError::UnknownRange(range_id))?;
        self.mark_committed(op_id, now_ms)?;
        let old = self.ranges.remove(&start).expect("range");
        let epoch = old.epoch + 1;
        let left = RangeDescriptor { end: Some(split_key.clone()), epoch, state: RangeState::Active, ..old.clone() };
        let right = RangeDescriptor {
            range_id: new_range_id,
            start: split_key.clone(),
            end: old.end,
            shard_id: target,
            epoch,
            state: RangeState::Active,
        };
        self.ranges.insert(left.start.clone(), left);
        self.ranges.insert(split_key, right);
        self.shards.insert(target, ShardDescriptor { shard_id: target, replicas: target_replicas, conf_version: 1 });
        Ok(())
    }

    fn abort(&mut self, op_id: OpId, reason: &str, now_ms: u64, learner_only: bool) -> Result<(), MetaError> {
        let op = self.op_mut(op_id)?;
        let is_move = matches!(op.kind, OpKind::Move { .. });
        match op.phase {
            Phase::Aborted => return Ok(()),
            // The driver saw the new replica still only a learner: the
            // joint configuration was never entered, the move can go back.
            Phase::Joint if is_move && learner_only => {}
            Phase::Joint | Phase::Committed | Phase::Done => return Err(MetaError::AlreadyCommitted(op_id)),
            _ => {}
        }
        op.phase = Phase::Aborted;
        op.error = Some(reason.to_string());
        op.history.push((Phase::Aborted, now_ms));
        let busy = match &op.kind {
            OpKind::Split { range_id, .. } => vec![*range_id],
            OpKind::Merge { left_range, right_range, .. } => vec![*left_range, *right_range],
            OpKind::Move { .. } => Vec::new(),
        };
        for range_id in busy {
            if let Some(start) = self.range_start(range_id) {
                let r = self.ranges.get_mut(&start).expect("range");
                if r.state == (RangeState::Busy { op_id }) {
                    r.state = RangeState::Active;
                }
            }
        }
        Ok(())
    }

    /// Plans merging `range_id` with the range that starts where it ends.
    fn plan_merge(&mut self, range_id: RangeId, reason: &str, now_ms: u64) -> Result<OpId, MetaError> {
        let start = self.range_start(range_id).ok_or(MetaError::UnknownRange(range_id))?;
        let left = self.ranges[&start].clone();
        let right =
            left.end.as_ref().and_then(|e| self.ranges.get(e)).cloned().ok_or(MetaError::LastRange(range_id))?;
        for r in [&left, &right] {
            if let RangeState::Busy { op_id } = r.state {
                return Err(MetaError::RangeBusy { range_id: r.range_id, op_id });
            }
        }
        for shard_id in [left.shard_id, right.shard_id] {
            if let Some(op_id) = self.group_busy(shard_id) {
                return Err(MetaError::ShardBusy { shard_id, op_id });
            }
        }
        let right_replicas =
            self.shards.get(&right.shard_id).ok_or(MetaError::UnknownShard(right.shard_id))?.replicas.clone();
        if left.shard_id == right.shard_id {
            return Err(MetaError::OneShard { range_id, shard_id: left.shard_id });
        }
        if let Some(prefix) = self.keyspaces.bound_at(&left.start, &right.start) {
            let why = format!("{:?} is a bucket boundary of keyspace {prefix:?}", right.start);
            return Err(MetaError::BadMerge { range_id, why });
        }
        for r in [&left, &right] {
            if self.ranges.values().filter(|o| o.shard_id == r.shard_id).count() != 1 {
                let why = format!("shard {} holds other ranges besides range {}", r.shard_id, r.range_id);
                return Err(MetaError::BadMerge { range_id, why });
            }
        }
        let op_id = self.next_op_id.max(1);
        for r in [&left, &right] {
            self.ranges.get_mut(&r.start).expect("range").state = RangeState::Busy { op_id };
        }
        let kind = OpKind::Merge {
            left_range: left.range_id,
            right_range: right.range_id,
            left: left.shard_id,
            right: right.shard_id,
            right_replicas,
            reason: reason.to_string(),
            frozen_ts: 0,
            merged: None,
        };
        let created = self.new_op(kind, now_ms);
        debug_assert_eq!(created, op_id);
        Ok(op_id)
    }

    /// The merge's commit point: one range, of the left shard, at an epoch
    /// above both; the right shard leaves the directory.
    fn commit_merge(&mut self, op_id: OpId, now_ms: u64, frozen_ts: u64) -> Result<(), MetaError> {
        let Some(kind) = self.committing(op_id, Phase::Frozen)? else { return Ok(()) };
        let OpKind::Merge { left_range, right_range, right, .. } = kind else {
            return Err(MetaError::UnknownOp(op_id));
        };
        let left_start = self.range_start(left_range).ok_or(MetaError::UnknownRange(left_range))?;
        let right_start = self.range_start(right_range).ok_or(MetaError::UnknownRange(right_range))?;
        self.mark_committed(op_id, now_ms)?;
        let l = self.ranges.remove(&left_start).expect("range");
        let r = self.ranges.remove(&right_start).expect("range");
        let joined = RangeDescriptor { end: r.end, epoch: l.epoch.max(r.epoch) + 1, state: RangeState::Active, ..l };
        if let Some(OpKind::Merge { frozen_ts: f, merged, .. }) = self.ops.get_mut(&op_id).map(|o| &mut o.kind) {
            (*f, *merged) = (frozen_ts, Some(joined.clone()));
        }
        self.ranges.insert(joined.start.clone(), joined);
        self.shards.remove(&right);
        Ok(())
    }

    fn new_op(&mut self, kind: OpKind, now_ms: u64) -> OpId {
        let op_id = self.next_op_id.max(1);
        self.next_op_id = op_id + 1;
        self.ops.insert(
            op_id,
            Operation {
                op_id,
                kind,
                phase: Phase::Planned,
                history: vec![(Phase::Planned, now_ms)],
                progress: Progress::default(),
                write_pause_ms: None,
                error: None,
                cleaned: false,
            },
        );
        op_id
    }

    fn plan_move(
        &mut self,
        shard_id: ShardId,
        from_node: NodeId,
        to_node: NodeId,
        reason: &str,
        now_ms: u64,
    ) -> Result<OpId, MetaError> {
        let group = self.group(shard_id).ok_or(MetaError::UnknownShard(shard_id))?;
        let from = group
            .replica_on(from_node)
            .cloned()
            .ok_or_else(|| MetaError::BadMove(format!("node {from_node} holds no replica of shard {shard_id}")))?;
        if group.replica_on(to_node).is_some() {
            return Err(MetaError::BadMove(format!("node {to_node} already holds a replica of shard {shard_id}")));
        }
        match self.nodes.get(&to_node) {
            None => return Err(MetaError::UnknownNode(to_node)),
            Some(n) if n.state != NodeState::Active => {
                return Err(MetaError::BadMove(format!("node {to_node} is not active")));
            }
            Some(_) => {}
        }
        if let Some(op_id) = self.group_busy(shard_id) {
            return Err(MetaError::ShardBusy { shard_id, op_id });
        }
        let to = Replica { replica_id: self.alloc_replica_id(), node_id: to_node };
        Ok(self.new_op(OpKind::Move { shard_id, from, to, reason: reason.to_string() }, now_ms))
    }

    fn commit_move(&mut self, op_id: OpId, now_ms: u64) -> Result<(), MetaError> {
        let Some(kind) = self.committing(op_id, Phase::Joint)? else { return Ok(()) };
        let OpKind::Move { shard_id, from, to, .. } = kind else {
            return Err(MetaError::UnknownOp(op_id));
        };
        if self.group(shard_id).is_none() {
            return Err(MetaError::UnknownShard(shard_id));
        }
        self.mark_committed(op_id, now_ms)?;
        let group = if shard_id == META_GROUP { self.meta.as_mut() } else { self.shards.get_mut(&shard_id) };
        let group = group.expect("checked above");
        group.replicas.retain(|r| r.replica_id != from.replica_id);
        if !group.replicas.contains(&to) {
            group.replicas.push(to);
        }
        group.conf_version += 1;
        Ok(())
    }

    fn set_node_state(&mut self, node_id: NodeId, state: NodeState) -> Result<(), MetaError> {
        let hosted = self.replica_count(node_id);
        let stuck = self.unplaceable_groups(node_id);
        let node = self.nodes.get_mut(&node_id).ok_or(MetaError::UnknownNode(node_id))?;
        let bad = |msg: &str| Err(MetaError::BadNodeState { node: node_id, msg: msg.to_string() });
        match (node.state, state) {
            (a, b) if a == b => return Ok(()),
            (NodeState::Removed, _) => return bad("was removed and cannot come back"),
            (NodeState::Active, NodeState::Removed) => return bad("decommission it first"),
            // Refused up front rather than left waiting forever.
            (NodeState::Active, NodeState::Decommissioning) if !stuck.is_empty() => {
                return bad(&format!(
                    "groups {stuck:?} would not have enough active nodes left for their replicas; \
                     add a node first"
                ));
            }
            (NodeState::Decommissioning, NodeState::Removed) if hosted > 0 => {
                return bad(&format!("still hosts {hosted} replicas"));
            }
            _ => {}
        }
        node.state = state;
        Ok(())
    }

    /// Groups on `node` with more replicas than there are other active
    /// nodes: with `node` (and any node already decommissioning) left out,
    /// they could not keep their replica count, so a decommission of `node`
    /// could never finish.
    fn unplaceable_groups(&self, node: NodeId) -> Vec<ShardId> {
        let others = self.nodes.values().filter(|n| n.id != node && n.state == NodeState::Active).count();
        self.groups_on(node).filter(|g| g.replicas.len() > others).map(|g| g.shard_id).collect()
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

    /// Applies one command. Deterministic; on error nothing changes: the
    /// command runs on a copy, which replaces the directory only when it
    /// succeeds (a refusal found half way through a command can then never
    /// leave a half-applied change behind).
    pub fn apply(&mut self, cmd: &MetaCommand) -> Result<MetaResponse, MetaError> {
        self.apply_keeping_previous(cmd).map(|(resp, _)| resp)
    }

    /// Applies `cmd` like [`Self::apply`] and, when it changed the
    /// directory, also answers the directory as it was before (what a store
    /// of the directory compares with to write only what changed).
    pub fn apply_keeping_previous(&mut self, cmd: &MetaCommand) -> Result<(MetaResponse, Directory), MetaError> {
        let mut next = self.clone();
        let resp = next.apply_in_place(cmd)?;
        Ok((resp, std::mem::replace(self, next)))
    }

    fn apply_in_place(&mut self, cmd: &MetaCommand) -> Result<MetaResponse, MetaError> {
        let resp = match cmd {
            // A join retried after its answer was lost (same id, same
            // address, still active) gets the same answer, not a refusal.
            MetaCommand::JoinNode { node_id: Some(id), raft_addr, .. }
                if self.nodes.get(id).is_some_and(|n| n.state == NodeState::Active && &n.raft_addr == raft_addr) =>
            {
                return Ok(MetaResponse::Node(*id));
            }
            MetaCommand::JoinNode { node_id: Some(id), .. } if self.nodes.contains_key(id) => {
                return Err(match self.nodes[id].state {
                    NodeState::Removed => MetaError::NodeRemoved(*id),
                    _ => MetaError::NodeExists(*id),
                });
            }
            MetaCommand::RegisterNode { node_id, raft_addr, api_addr }
            | MetaCommand::JoinNode { node_id, raft_addr, api_addr } => {
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
            MetaCommand::PlanSplit { range_id, split_key, target_nodes, reason, now_ms } => {
                MetaResponse::Op(self.plan_split(*range_id, split_key, target_nodes, reason, *now_ms)?)
            }
            MetaCommand::AdvanceOp { op_id, from, to, now_ms } => {
                self.advance(*op_id, *from, *to, *now_ms)?;
                MetaResponse::Done
            }
            MetaCommand::ReportProgress { op_id, progress } => {
                self.op_mut(*op_id)?.progress = progress.clone();
                MetaResponse::Done
            }
            MetaCommand::CommitSplit { op_id, now_ms } => {
                self.commit_split(*op_id, *now_ms)?;
                MetaResponse::Done
            }
            MetaCommand::DeclareKeyspace { prefix, buckets } => {
                self.keyspaces.check_new(prefix, *buckets)?;
                let declared = crate::keyspace::Keyspace { buckets: *buckets, active: false };
                self.keyspaces.0.entry(prefix.clone()).or_insert(declared);
                MetaResponse::Done
            }
            MetaCommand::ActivateKeyspace { prefix } => {
                let k = self.keyspaces.0.get_mut(prefix).ok_or_else(|| MetaError::UnknownKeyspace(prefix.clone()))?;
                k.active = true;
                MetaResponse::Done
            }
            MetaCommand::PlanMerge { range_id, reason, now_ms } => {
                MetaResponse::Op(self.plan_merge(*range_id, reason, *now_ms)?)
            }
            MetaCommand::CommitMerge { op_id, now_ms, frozen_ts } => {
                self.commit_merge(*op_id, *now_ms, *frozen_ts)?;
                MetaResponse::Done
            }
            MetaCommand::PlanMove { shard_id, from_node, to_node, reason, now_ms } => {
                MetaResponse::Op(self.plan_move(*shard_id, *from_node, *to_node, reason, *now_ms)?)
            }
            MetaCommand::CommitMove { op_id, now_ms } => {
                self.commit_move(*op_id, *now_ms)?;
                MetaResponse::Done
            }
            MetaCommand::SetNodeState { node_id, state } => {
                self.set_node_state(*node_id, *state)?;
                MetaResponse::Done
            }
            MetaCommand::AbortOp { op_id, reason, now_ms, learner_only } => {
                self.abort(*op_id, reason, *now_ms, *learner_only)?;
                MetaResponse::Done
            }
            MetaCommand::FinishOp { op_id, write_pause_ms, now_ms } => {
                self.advance(*op_id, Phase::Committed, Phase::Done, *now_ms)?;
                let op = self.op_mut(*op_id)?;
                if write_pause_ms.is_some() {
                    op.write_pause_ms = *write_pause_ms;
                }
                self.prune_ops();
                MetaResponse::Done
            }
            MetaCommand::MarkCleaned { op_id } => {
                self.op_mut(*op_id)?.cleaned = true;
                self.prune_ops();
                MetaResponse::Done
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
    fn new_groups_are_placed_only_on_live_nodes() {
        let nodes: Vec<(NodeId, String)> = (1..=4).map(|n| (n, format!("n{n}"))).collect();
        let d = Directory::bootstrap(&nodes[..3], 3);
        // Node 2 is down: with three nodes a new group of three cannot be placed.
        let r = d.place_new_group(&[1, 3], 3);
        assert!(matches!(r, Err(MetaError::BadPlacement(m)) if m.contains("2 are live")));
        assert_eq!(d.place_new_group(&[1, 2, 3], 3).unwrap().len(), 3);
        // Never on a node that is not live, even when it holds the fewest.
        let mut d = d;
        d.nodes.insert(4, NodeDescriptor { id: 4, ..d.nodes[&1].clone() });
        let placed = d.place_new_group(&[1, 2, 3], 3).unwrap();
        assert!(!placed.contains(&4), "{placed:?}");
        assert_eq!(d.place_new_group(&[1, 2, 4], 3).unwrap()[0], 4, "the emptiest live node first");
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

#[cfg(test)]
mod split_tests {
    use super::*;

    fn dir() -> Directory {
        Directory::bootstrap(&[(1, "a:1".into()), (2, "a:2".into()), (3, "a:3".into())], 3)
    }

    fn plan(d: &mut Directory, key: &str) -> Result<OpId, MetaError> {
        let range_id = d.lookup(key).unwrap().range_id;
        match d.apply(&MetaCommand::PlanSplit {
            range_id,
            split_key: key.into(),
            target_nodes: vec![1, 2, 3],
            reason: "admin".into(),
            now_ms: 1,
        })? {
            MetaResponse::Op(id) => Ok(id),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn drive_to_frozen(d: &mut Directory, op: OpId) {
        for (from, to) in
            [(Phase::Planned, Phase::Created), (Phase::Created, Phase::Capturing), (Phase::Capturing, Phase::Frozen)]
        {
            d.apply(&MetaCommand::AdvanceOp { op_id: op, from, to, now_ms: 2 }).unwrap();
        }
    }

    #[test]
    fn split_commit_rewrites_ranges_and_bumps_epochs() {
        let mut d = dir();
        let op = plan(&mut d, "m").unwrap();
        assert!(matches!(d.lookup("a").unwrap().state, RangeState::Busy { op_id } if op_id == op));
        assert!(matches!(plan(&mut d, "q"), Err(MetaError::RangeBusy { .. })), "one operation per range");
        // commit before freeze is refused
        assert!(matches!(
            d.apply(&MetaCommand::CommitSplit { op_id: op, now_ms: 3 }),
            Err(MetaError::WrongPhase { .. })
        ));
        drive_to_frozen(&mut d, op);
        d.apply(&MetaCommand::CommitSplit { op_id: op, now_ms: 3 }).unwrap();
        d.check().unwrap();
        let (l, r) = (d.lookup("a").unwrap().clone(), d.lookup("m").unwrap().clone());
        assert_eq!((l.end.as_deref(), l.epoch, l.shard_id), (Some("m"), 2, 1));
        assert_eq!((r.start.as_str(), r.end.as_deref(), r.epoch), ("m", None, 2));
        assert_ne!(r.shard_id, 1);
        assert_eq!(d.shards[&r.shard_id].replicas.len(), 3);
        // committing again is harmless; aborting now is refused
        d.apply(&MetaCommand::CommitSplit { op_id: op, now_ms: 4 }).unwrap();
        assert_eq!(d.ranges.len(), 2);
        assert_eq!(
            d.apply(&MetaCommand::AbortOp { op_id: op, reason: "x".into(), now_ms: 5, learner_only: false }),
            Err(MetaError::AlreadyCommitted(op))
        );
        d.apply(&MetaCommand::FinishOp { op_id: op, write_pause_ms: Some(7), now_ms: 6 }).unwrap();
        assert_eq!(d.ops[&op].phase, Phase::Done);
        assert_eq!(d.ops[&op].write_pause_ms, Some(7));
        assert!(d.active_ops().next().is_none());
    }

    #[test]
    fn abort_frees_the_range_and_commit_can_no_longer_win() {
        let mut d = dir();
        let op = plan(&mut d, "m").unwrap();
        drive_to_frozen(&mut d, op);
        d.apply(&MetaCommand::AbortOp { op_id: op, reason: "cancelled".into(), now_ms: 3, learner_only: false })
            .unwrap();
        assert_eq!(d.lookup("z").unwrap().state, RangeState::Active);
        assert!(d.apply(&MetaCommand::CommitSplit { op_id: op, now_ms: 4 }).is_err());
        assert_eq!(d.ranges.len(), 1);
        assert_eq!(d.active_ops().count(), 1, "leftovers still to clean");
        d.apply(&MetaCommand::MarkCleaned { op_id: op }).unwrap();
        assert_eq!(d.active_ops().count(), 0);
        // the range can be split again
        plan(&mut d, "n").unwrap();
    }

    #[test]
    fn split_keys_must_be_strictly_inside() {
        let mut d = dir();
        assert!(matches!(plan(&mut d, ""), Err(MetaError::BadSplitKey { .. })), "at the range start");
        let op = plan(&mut d, "m").unwrap();
        drive_to_frozen(&mut d, op);
        d.apply(&MetaCommand::CommitSplit { op_id: op, now_ms: 3 }).unwrap();
        let left = d.lookup("a").unwrap().range_id;
        let r = d.apply(&MetaCommand::PlanSplit {
            range_id: left,
            split_key: "m".into(),
            target_nodes: vec![1],
            reason: "admin".into(),
            now_ms: 1,
        });
        assert!(matches!(r, Err(MetaError::BadSplitKey { .. })), "at the range end");
        let r = d.apply(&MetaCommand::PlanSplit {
            range_id: left,
            split_key: "z".into(),
            target_nodes: vec![1],
            reason: "admin".into(),
            now_ms: 1,
        });
        assert!(matches!(r, Err(MetaError::BadSplitKey { .. })), "outside");
        let r = d.apply(&MetaCommand::PlanSplit {
            range_id: left,
            split_key: "c".into(),
            target_nodes: vec![9],
            reason: "admin".into(),
            now_ms: 1,
        });
        assert!(matches!(r, Err(MetaError::BadPlacement(_))));
        let r = d.apply(&MetaCommand::PlanSplit {
            range_id: 99,
            split_key: "c".into(),
            target_nodes: vec![1],
            reason: "admin".into(),
            now_ms: 1,
        });
        assert_eq!(r, Err(MetaError::UnknownRange(99)));
    }

    #[test]
    fn phases_only_move_forward_in_order() {
        let mut d = dir();
        let op = plan(&mut d, "m").unwrap();
        let skip =
            d.apply(&MetaCommand::AdvanceOp { op_id: op, from: Phase::Created, to: Phase::Capturing, now_ms: 1 });
        assert!(matches!(skip, Err(MetaError::WrongPhase { .. })));
        d.apply(&MetaCommand::AdvanceOp { op_id: op, from: Phase::Planned, to: Phase::Created, now_ms: 1 }).unwrap();
        // repeating a transition that already happened is a no-op
        d.apply(&MetaCommand::AdvanceOp { op_id: op, from: Phase::Planned, to: Phase::Created, now_ms: 1 }).unwrap();
        assert_eq!(d.ops[&op].history.len(), 2);
        let back = d.apply(&MetaCommand::AdvanceOp { op_id: op, from: Phase::Created, to: Phase::Planned, now_ms: 1 });
        assert!(back.is_err());
    }
}

#[cfg(test)]
mod move_tests {
    use super::*;

    fn dir4() -> Directory {
        let mut d = Directory::bootstrap(&[(1, "a:1".into()), (2, "a:2".into()), (3, "a:3".into())], 3);
        d.apply(&MetaCommand::RegisterNode { node_id: Some(4), raft_addr: "a:4".into(), api_addr: None }).unwrap();
        d
    }

    fn plan(d: &mut Directory, shard_id: ShardId, from_node: NodeId, to_node: NodeId) -> Result<OpId, MetaError> {
        match d.apply(&MetaCommand::PlanMove { shard_id, from_node, to_node, reason: "admin".into(), now_ms: 1 })? {
            MetaResponse::Op(id) => Ok(id),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn to_joint(d: &mut Directory, op: OpId) {
        for (from, to) in
            [(Phase::Planned, Phase::Created), (Phase::Created, Phase::Learning), (Phase::Learning, Phase::Joint)]
        {
            d.apply(&MetaCommand::AdvanceOp { op_id: op, from, to, now_ms: 2 }).unwrap();
        }
    }

    #[test]
    fn a_move_replaces_the_replica_with_a_fresh_id() {
        let mut d = dir4();
        let old_ids: Vec<_> = d.shards[&1].replicas.iter().map(|r| r.replica_id).collect();
        let op = plan(&mut d, 1, 1, 4).unwrap();
        let OpKind::Move { to, .. } = d.ops[&op].kind.clone() else { panic!() };
        assert!(!old_ids.contains(&to.replica_id), "member ids are never reused");
        assert!(d.expects_replica(4, 1), "the target may keep its new replica while the move runs");
        assert_eq!(d.replica_count(4), 1);
        assert_eq!(d.group_replicas(1).unwrap().len(), 4, "routing knows the learner");
        assert!(matches!(plan(&mut d, 1, 2, 4), Err(MetaError::ShardBusy { .. })), "one operation per shard");
        let split = d.apply(&MetaCommand::PlanSplit {
            range_id: 1,
            split_key: "m".into(),
            target_nodes: vec![2, 3, 4],
            reason: "admin".into(),
            now_ms: 1,
        });
        assert!(matches!(split, Err(MetaError::ShardBusy { .. })), "no split of a shard being moved");
        to_joint(&mut d, op);
        assert_eq!(
            d.apply(&MetaCommand::AbortOp { op_id: op, reason: "x".into(), now_ms: 3, learner_only: false }),
            Err(MetaError::AlreadyCommitted(op)),
            "no abort once the joint configuration may exist"
        );
        let v = d.shards[&1].conf_version;
        d.apply(&MetaCommand::CommitMove { op_id: op, now_ms: 3 }).unwrap();
        d.apply(&MetaCommand::CommitMove { op_id: op, now_ms: 3 }).unwrap();
        let nodes: Vec<_> = d.shards[&1].replicas.iter().map(|r| r.node_id).collect();
        assert_eq!(nodes, vec![2, 3, 4]);
        assert_eq!(d.shards[&1].conf_version, v + 1);
        assert!(!d.expects_replica(1, 1), "the source may delete its replica");
        d.apply(&MetaCommand::FinishOp { op_id: op, write_pause_ms: None, now_ms: 4 }).unwrap();
        assert!(d.group_busy(1).is_none());
        d.check().unwrap();
    }

    #[test]
    fn the_metadata_group_moves_too() {
        let mut d = dir4();
        let op = plan(&mut d, META_GROUP, 2, 4).unwrap();
        to_joint(&mut d, op);
        d.apply(&MetaCommand::CommitMove { op_id: op, now_ms: 3 }).unwrap();
        let nodes: Vec<_> = d.meta.as_ref().unwrap().replicas.iter().map(|r| r.node_id).collect();
        assert_eq!(nodes, vec![1, 3, 4]);
    }

    #[test]
    fn bad_moves_are_refused() {
        let mut d = dir4();
        assert_eq!(plan(&mut d, 9, 1, 4), Err(MetaError::UnknownShard(9)));
        assert!(matches!(plan(&mut d, 1, 4, 1), Err(MetaError::BadMove(_))), "no replica on the source");
        assert!(matches!(plan(&mut d, 1, 1, 2), Err(MetaError::BadMove(_))), "target already a member");
        assert_eq!(plan(&mut d, 1, 1, 7), Err(MetaError::UnknownNode(7)));
        d.apply(&MetaCommand::SetNodeState { node_id: 4, state: NodeState::Decommissioning }).unwrap();
        assert!(matches!(plan(&mut d, 1, 1, 4), Err(MetaError::BadMove(_))), "target decommissioning");
    }

    #[test]
    fn an_aborted_move_frees_the_shard_and_its_learner_is_unwanted() {
        let mut d = dir4();
        let op = plan(&mut d, 1, 1, 4).unwrap();
        d.apply(&MetaCommand::AdvanceOp { op_id: op, from: Phase::Planned, to: Phase::Created, now_ms: 2 }).unwrap();
        let skip =
            d.apply(&MetaCommand::AdvanceOp { op_id: op, from: Phase::Created, to: Phase::Capturing, now_ms: 2 });
        assert!(matches!(skip, Err(MetaError::WrongPhase { .. })), "split phases are not move phases");
        d.apply(&MetaCommand::AbortOp { op_id: op, reason: "cancelled".into(), now_ms: 3, learner_only: false })
            .unwrap();
        assert!(!d.expects_replica(4, 1));
        assert!(d.apply(&MetaCommand::CommitMove { op_id: op, now_ms: 4 }).is_err());
        assert_eq!(d.group_busy(1), Some(op), "busy until its leftovers are cleaned");
        d.apply(&MetaCommand::MarkCleaned { op_id: op }).unwrap();
        assert_eq!(d.group_busy(1), None);
        assert_eq!(d.shards[&1].replicas.iter().map(|r| r.node_id).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn a_failed_command_changes_nothing() {
        let mut d = dir4();
        let op = plan(&mut d, 1, 1, 4).unwrap();
        to_joint(&mut d, op);
        // An inconsistent directory (the move's shard is gone): the commit
        // is refused, and must not have advanced the operation first.
        d.shards.remove(&1);
        let before = d.clone();
        assert_eq!(d.apply(&MetaCommand::CommitMove { op_id: op, now_ms: 3 }), Err(MetaError::UnknownShard(1)));
        assert_eq!(d, before, "a refused command left a change behind");
        // Same for a split whose range vanished.
        let mut d = Directory::bootstrap(&[(1, "a:1".into()), (2, "a:2".into()), (3, "a:3".into())], 3);
        let op = match d
            .apply(&MetaCommand::PlanSplit {
                range_id: 1,
                split_key: "m".into(),
                target_nodes: vec![1, 2, 3],
                reason: "admin".into(),
                now_ms: 1,
            })
            .unwrap()
        {
            MetaResponse::Op(op) => op,
            other => panic!("{other:?}"),
        };
        for (from, to) in
            [(Phase::Planned, Phase::Created), (Phase::Created, Phase::Capturing), (Phase::Capturing, Phase::Frozen)]
        {
            d.apply(&MetaCommand::AdvanceOp { op_id: op, from, to, now_ms: 2 }).unwrap();
        }
        let r = d.ranges.remove("").unwrap();
        d.ranges.insert("".into(), RangeDescriptor { range_id: 99, ..r });
        let before = d.clone();
        assert_eq!(d.apply(&MetaCommand::CommitSplit { op_id: op, now_ms: 3 }), Err(MetaError::UnknownRange(1)));
        assert_eq!(d, before);
    }

    #[test]
    fn a_joint_move_aborts_only_while_its_replica_is_still_a_learner() {
        let mut d = dir4();
        let op = plan(&mut d, 1, 1, 4).unwrap();
        to_joint(&mut d, op);
        let abort = |learner_only| MetaCommand::AbortOp { op_id: op, reason: "x".into(), now_ms: 3, learner_only };
        assert_eq!(d.apply(&abort(false)), Err(MetaError::AlreadyCommitted(op)));
        d.apply(&abort(true)).unwrap();
        assert_eq!(d.ops[&op].phase, Phase::Aborted);
        assert!(!d.expects_replica(4, 1));
        assert_eq!(d.shards[&1].replicas.iter().map(|r| r.node_id).collect::<Vec<_>>(), vec![1, 2, 3]);
        // Once committed, never.
        d.apply(&MetaCommand::MarkCleaned { op_id: op }).unwrap();
        let op = plan(&mut d, 1, 2, 4).unwrap();
        to_joint(&mut d, op);
        d.apply(&MetaCommand::CommitMove { op_id: op, now_ms: 4 }).unwrap();
        let r = d.apply(&MetaCommand::AbortOp { op_id: op, reason: "x".into(), now_ms: 5, learner_only: true });
        assert_eq!(r, Err(MetaError::AlreadyCommitted(op)));
    }

    #[test]
    fn joining_under_a_taken_id_is_refused() {
        let mut d = dir4();
        let join = |id| MetaCommand::JoinNode { node_id: id, raft_addr: "w:1".into(), api_addr: None };
        assert_eq!(d.apply(&join(Some(3))), Err(MetaError::NodeExists(3)));
        assert_eq!(d.nodes[&3].raft_addr, "a:3", "the active node keeps its address");
        assert_eq!(d.apply(&join(None)), Ok(MetaResponse::Node(5)));
        assert_eq!(d.apply(&join(Some(9))).map(|_| ()), Err(MetaError::AddressInUse { addr: "w:1".into(), node: 5 }));
        let fresh = MetaCommand::JoinNode { node_id: Some(9), raft_addr: "w:9".into(), api_addr: None };
        assert_eq!(d.apply(&fresh), Ok(MetaResponse::Node(9)));
        let version = d.version;
        assert_eq!(d.apply(&fresh), Ok(MetaResponse::Node(9)), "a retried join gets the same answer");
        assert_eq!(d.version, version, "and changes nothing");
        // Heartbeats keep updating addresses of known nodes.
        let moved = MetaCommand::RegisterNode { node_id: Some(3), raft_addr: "a:33".into(), api_addr: None };
        d.apply(&moved).unwrap();
        assert_eq!(d.nodes[&3].raft_addr, "a:33");
    }

    #[test]
    fn node_lifecycle() {
        let set = |d: &mut Directory, node_id, state| d.apply(&MetaCommand::SetNodeState { node_id, state });
        // Three nodes, three replicas per group: nowhere to move node 1's replicas to.
        let mut d3 = Directory::bootstrap(&[(1, "a:1".into()), (2, "a:2".into()), (3, "a:3".into())], 3);
        let refused = set(&mut d3, 1, NodeState::Decommissioning);
        assert!(
            matches!(&refused, Err(MetaError::BadNodeState { msg, .. }) if msg.contains("add a node")),
            "{refused:?}"
        );
        assert_eq!(d3.nodes[&1].state, NodeState::Active);
        let mut d = dir4();
        assert!(matches!(set(&mut d, 1, NodeState::Removed), Err(MetaError::BadNodeState { .. })));
        set(&mut d, 1, NodeState::Decommissioning).unwrap();
        // Node 4 is the only place left for node 1's and node 2's replicas:
        // a second decommission among the founders is refused.
        assert!(matches!(set(&mut d, 2, NodeState::Decommissioning), Err(MetaError::BadNodeState { .. })));
        assert!(matches!(set(&mut d, 1, NodeState::Removed), Err(MetaError::BadNodeState { .. })), "still hosts");
        set(&mut d, 1, NodeState::Active).unwrap();
        set(&mut d, 4, NodeState::Decommissioning).unwrap();
        set(&mut d, 4, NodeState::Removed).unwrap();
        assert!(matches!(set(&mut d, 4, NodeState::Active), Err(MetaError::BadNodeState { .. })));
        assert_eq!(set(&mut d, 9, NodeState::Decommissioning), Err(MetaError::UnknownNode(9)));
        let rejoin = d.apply(&MetaCommand::RegisterNode { node_id: Some(4), raft_addr: "a:4".into(), api_addr: None });
        assert_eq!(rejoin, Err(MetaError::NodeRemoved(4)));
    }
}

#[cfg(test)]
mod merge_tests {
    use super::*;

    /// Three nodes, ranges `["", m)` and `[m, ∞)` on two shards (a split done).
    fn two_ranges() -> Directory {
        let mut d = Directory::bootstrap(&[(1, "a:1".into()), (2, "a:2".into()), (3, "a:3".into())], 3);
        let plan = MetaCommand::PlanSplit {
            range_id: 1,
            split_key: "m".into(),
            target_nodes: vec![1, 2, 3],
            reason: "admin".into(),
            now_ms: 1,
        };
        let MetaResponse::Op(op) = d.apply(&plan).unwrap() else { panic!() };
        for (from, to) in
            [(Phase::Planned, Phase::Created), (Phase::Created, Phase::Capturing), (Phase::Capturing, Phase::Frozen)]
        {
            d.apply(&MetaCommand::AdvanceOp { op_id: op, from, to, now_ms: 2 }).unwrap();
        }
        d.apply(&MetaCommand::CommitSplit { op_id: op, now_ms: 3 }).unwrap();
        d.apply(&MetaCommand::FinishOp { op_id: op, write_pause_ms: None, now_ms: 4 }).unwrap();
        d
    }

    fn merge(d: &mut Directory, range_id: RangeId) -> Result<OpId, MetaError> {
        match d.apply(&MetaCommand::PlanMerge { range_id, reason: "admin".into(), now_ms: 10 })? {
            MetaResponse::Op(op) => Ok(op),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn to_frozen(d: &mut Directory, op: OpId) {
        for (from, to) in
            [(Phase::Planned, Phase::Created), (Phase::Created, Phase::Capturing), (Phase::Capturing, Phase::Frozen)]
        {
            d.apply(&MetaCommand::AdvanceOp { op_id: op, from, to, now_ms: 11 }).unwrap();
        }
    }

    #[test]
    fn a_merge_commits_one_range_of_the_left_shard_at_an_epoch_above_both() {
        let mut d = two_ranges();
        let (left, right) = (d.lookup("a").unwrap().clone(), d.lookup("m").unwrap().clone());
        let op = merge(&mut d, left.range_id).unwrap();
        assert!(d.ranges.values().all(|r| r.state == RangeState::Busy { op_id: op }), "both ranges busy");
        assert_eq!(d.group_busy(right.shard_id), Some(op));
        let refused = d.apply(&MetaCommand::CommitMerge { op_id: op, now_ms: 12, frozen_ts: 7 });
        assert!(matches!(refused, Err(MetaError::WrongPhase { .. })), "not before the freeze");
        let skip = MetaCommand::AdvanceOp { op_id: op, from: Phase::Planned, to: Phase::Capturing, now_ms: 1 };
        assert!(d.apply(&skip).is_err(), "a merge captures only once the left shard is ready to absorb");
        to_frozen(&mut d, op);
        d.apply(&MetaCommand::CommitMerge { op_id: op, now_ms: 12, frozen_ts: 7 }).unwrap();
        d.check().unwrap();
        assert!(d.expects_replica(1, right.shard_id), "the right shard's replicas are kept until the cutover");
        assert_eq!(d.ranges.len(), 1);
        let one = d.lookup("z").unwrap();
        assert_eq!((one.range_id, one.start.as_str(), one.end.as_deref()), (left.range_id, "", None));
        assert_eq!(
            (one.shard_id, one.epoch, one.state.clone()),
            (left.shard_id, left.epoch.max(right.epoch) + 1, RangeState::Active)
        );
        assert!(!d.shards.contains_key(&right.shard_id), "the right shard is gone from the directory");
        let OpKind::Merge { right_replicas, frozen_ts, .. } = &d.ops[&op].kind else { panic!() };
        assert_eq!(right_replicas.len(), 3, "its replicas are remembered, to destroy");
        assert_eq!(*frozen_ts, 7, "the right shard's freeze is kept for the cutover");
        let OpKind::Merge { merged, .. } = &d.ops[&op].kind else { panic!() };
        assert_eq!(merged.as_ref(), Some(one), "the merged range is kept for the cutover");
        d.apply(&MetaCommand::CommitMerge { op_id: op, now_ms: 13, frozen_ts: 7 }).unwrap();
        assert_eq!(d.ranges.len(), 1, "committing again changes nothing");
        let abort = MetaCommand::AbortOp { op_id: op, reason: "x".into(), now_ms: 14, learner_only: false };
        assert_eq!(d.apply(&abort), Err(MetaError::AlreadyCommitted(op)));
    }

    #[test]
    fn a_merge_is_refused_for_an_unknown_range_the_last_range_or_a_busy_one() {
        let mut d = two_ranges();
        let (left, right) = (d.lookup("a").unwrap().range_id, d.lookup("m").unwrap().range_id);
        assert_eq!(merge(&mut d, 99), Err(MetaError::UnknownRange(99)));
        assert_eq!(merge(&mut d, right), Err(MetaError::LastRange(right)));
        let op = merge(&mut d, left).unwrap();
        assert_eq!(merge(&mut d, left), Err(MetaError::RangeBusy { range_id: left, op_id: op }));
        let split = MetaCommand::PlanSplit {
            range_id: right,
            split_key: "t".into(),
            target_nodes: vec![1, 2, 3],
            reason: "admin".into(),
            now_ms: 1,
        };
        assert_eq!(d.apply(&split), Err(MetaError::RangeBusy { range_id: right, op_id: op }));
    }

    #[test]
    fn a_merge_across_a_keyspace_boundary_is_refused() {
        let mut d = two_ranges();
        let left = d.lookup("a").unwrap().range_id;
        d.apply(&MetaCommand::DeclareKeyspace { prefix: "m".into(), buckets: 2 }).unwrap();
        match merge(&mut d, left) {
            Err(MetaError::BadMerge { range_id, why }) => {
                assert!(range_id == left && why.contains("keyspace"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(d.ranges.values().all(|r| r.state == RangeState::Active), "nothing marked busy");
    }

    #[test]
    fn an_aborted_merge_frees_both_ranges_and_can_no_longer_commit() {
        let mut d = two_ranges();
        let left = d.lookup("a").unwrap().range_id;
        let op = merge(&mut d, left).unwrap();
        to_frozen(&mut d, op);
        let abort = MetaCommand::AbortOp { op_id: op, reason: "cancelled".into(), now_ms: 12, learner_only: false };
        d.apply(&abort).unwrap();
        assert!(d.ranges.values().all(|r| r.state == RangeState::Active));
        assert!(d.apply(&MetaCommand::CommitMerge { op_id: op, now_ms: 13, frozen_ts: 7 }).is_err());
        assert_eq!(d.ranges.len(), 2);
        d.apply(&MetaCommand::MarkCleaned { op_id: op }).unwrap();
        merge(&mut d, left).unwrap();
    }
}

#[cfg(test)]
mod keyspace_tests {
    use super::*;
    use crate::keyspace::{Keyspace, KeyspaceError};

    #[test]
    fn a_keyspace_is_declared_once_then_activated() {
        let mut d = Directory::bootstrap(&[(1, "a:1".into())], 1);
        let declare = |prefix: &str, buckets| MetaCommand::DeclareKeyspace { prefix: prefix.into(), buckets };
        d.apply(&declare("ev/", 8)).unwrap();
        assert_eq!(d.keyspaces.0["ev/"], Keyspace { buckets: 8, active: false });
        assert!(d.keyspaces.to_internal("ev/1").unwrap() != "ev/1", "mapped from the declaration on");
        d.apply(&declare("ev/", 8)).unwrap();
        let other = d.apply(&declare("ev/x", 4));
        assert!(matches!(other, Err(MetaError::Keyspace(KeyspaceError::Overlaps { .. }))), "{other:?}");
        assert_eq!(d.apply(&declare("x/", 1)), Err(MetaError::Keyspace(KeyspaceError::BadBuckets(1))));
        let activate = |prefix: &str| MetaCommand::ActivateKeyspace { prefix: prefix.into() };
        assert_eq!(d.apply(&activate("nope/")), Err(MetaError::UnknownKeyspace("nope/".into())));
        d.apply(&activate("ev/")).unwrap();
        assert!(d.keyspaces.0["ev/"].active);
        d.apply(&declare("ev/", 8)).unwrap();
        assert!(d.keyspaces.0["ev/"].active, "declaring again changes nothing");
    }
}
