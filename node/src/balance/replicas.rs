//! The replica balancer: what to change next, decided from the directory,
//! node liveness and shard leadership. Pure, so every rule is tested on its
//! own; [`super::run::replicas`] feeds it and carries the answer out.
//!
//! In order of urgency:
//! 1. **Heal**: a replica on a node silent for longer than `node_dead_after`
//!    is replaced by one on a live node, so every group returns to its
//!    replication factor without anyone's help. Healing is per replica too:
//!    a replica the directory lists on a node that heartbeats but has not
//!    reported holding it (that replica id) for `node_dead_after` — deleted
//!    by mistake, or lost with a wiped disk — is replaced the same way.
//! 2. **Decommission**: replicas leave decommissioning nodes; a
//!    decommissioning node left with none is marked removed.
//! 3. **Balance replicas**: while some live node holds more than `slack`
//!    replicas above another, one shard replica moves from the fullest to
//!    the emptiest. Only when every node is up, so a flapping node does not
//!    set replicas moving.
//! 4. **Balance leaders** the same way, by leader transfers (cheap: no data
//!    moves) of data shards; the metadata group's leadership counts but is
//!    not moved for balance.
//!
//! The slack is the hysteresis: a move changes the difference by two, so
//! with a slack of one the plan settles instead of flapping. At most
//! `max_moves` moves run at once and one group is touched by one operation
//! at a time.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use cleave_metadata::{Directory, NodeId, NodeState, OpKind, ShardDescriptor, ShardId};

/// Rebalancer settings.
#[derive(Clone, Debug)]
pub struct BalancePolicy {
    /// Silence after which a node's replicas are replaced.
    pub node_dead_after: Duration,
    /// Moves running at once.
    pub max_moves: usize,
    /// Even out replica and leader counts (healing and decommissioning run
    /// regardless).
    pub balance: bool,
    /// Difference in replica (and leader) counts tolerated between nodes.
    pub slack: usize,
}

/// What the replica balancer knows of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeHealth {
    pub id: NodeId,
    /// Heartbeats arrive.
    pub up: bool,
    /// How long the node has been silent (zero while up).
    pub silent_for: Duration,
}

/// One thing to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Move { shard: ShardId, from: NodeId, to: NodeId, reason: &'static str },
    TransferLeader { shard: ShardId, to: NodeId },
    MarkRemoved { node: NodeId },
}

struct View<'a> {
    dir: &'a Directory,
    health: BTreeMap<NodeId, NodeHealth>,
    counts: BTreeMap<NodeId, usize>,
    /// Groups an active operation holds (looked up once per plan: asking
    /// the directory per group walked every operation for every group).
    busy: std::collections::HashSet<ShardId>,
    policy: &'a BalancePolicy,
}

impl View<'_> {
    fn dead(&self, node: NodeId) -> bool {
        self.health.get(&node).is_some_and(|h| !h.up && h.silent_for >= self.policy.node_dead_after)
    }

    fn up(&self, node: NodeId) -> bool {
        self.health.get(&node).is_some_and(|h| h.up)
    }

    /// Live active nodes that could take a replica of `group`, emptiest first.
    fn targets(&self, group: &ShardDescriptor) -> Vec<NodeId> {
        let mut v: Vec<(usize, NodeId)> = self
            .dir
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Active && self.up(n.id) && group.replica_on(n.id).is_none())
            .map(|n| (self.counts.get(&n.id).copied().unwrap_or(0), n.id))
            .collect();
        v.sort();
        v.into_iter().map(|(_, id)| id).collect()
    }

    fn groups(&self) -> impl Iterator<Item = &ShardDescriptor> {
        self.dir.meta.iter().chain(self.dir.shards.values())
    }

    fn busy(&self, group: ShardId) -> bool {
        self.busy.contains(&group)
    }
}

/// Replicas the directory lists on live nodes that do not report holding
/// them: `(group, node)` → for how long they have been missing.
pub type Missing = BTreeMap<(ShardId, NodeId), Duration>;

/// The replicas in `dir` on `node` missing from `held`, the `(group,
/// replica)` pairs the node reported. Runs every second over every replica
/// of every node: a set, not a scan of `held` per replica (that was
/// O(replicas²), a tenth of a core on the metadata leader at 10,000 shards).
pub fn missing_on(dir: &Directory, node: NodeId, held: &[(ShardId, u64)]) -> Vec<ShardId> {
    let held: std::collections::HashSet<(ShardId, u64)> = held.iter().copied().collect();
    dir.groups_on(node)
        .filter(|g| g.replica_on(node).is_some_and(|r| !held.contains(&(g.shard_id, r.replica_id))))
        .map(|g| g.shard_id)
        .collect()
}

/// Picks what to start now. `leaders`: group → node currently leading it;
/// `missing`: see [`Missing`].
pub fn plan(
    dir: &Directory,
    health: &[NodeHealth],
    leaders: &HashMap<ShardId, NodeId>,
    missing: &Missing,
    policy: &BalancePolicy,
) -> Vec<Action> {
    let v = View {
        dir,
        health: health.iter().map(|h| (h.id, *h)).collect(),
        counts: dir.nodes.keys().map(|n| (*n, dir.replica_count(*n))).collect(),
        busy: dir.active_ops().flat_map(|op| op.kind.groups()).collect(),
        policy,
    };
    let running = dir.active_ops().filter(|op| matches!(op.kind, OpKind::Move { .. })).count();
    let mut budget = policy.max_moves.saturating_sub(running);
    let mut actions = Vec::new();
    let mut touched = std::collections::BTreeSet::new();

    // 1 and 2: replicas that must leave their node.
    for g in v.groups() {
        if v.busy(g.shard_id) {
            continue;
        }
        for r in &g.replicas {
            let leaving = dir.nodes.get(&r.node_id).is_some_and(|n| n.state == NodeState::Decommissioning);
            let lost = missing.get(&(g.shard_id, r.node_id)).is_some_and(|d| *d >= policy.node_dead_after);
            let reason = if v.dead(r.node_id) || (lost && v.up(r.node_id)) {
                "heal"
            } else if leaving {
                "decommission"
            } else {
                continue;
            };
            if budget == 0 || touched.contains(&g.shard_id) {
                break;
            }
            if let Some(to) = v.targets(g).first() {
                actions.push(Action::Move { shard: g.shard_id, from: r.node_id, to: *to, reason });
                touched.insert(g.shard_id);
                budget -= 1;
            }
        }
    }
    for n in dir.nodes.values() {
        if n.state == NodeState::Decommissioning && dir.replica_count(n.id) == 0 {
            actions.push(Action::MarkRemoved { node: n.id });
        }
    }
    if !policy.balance || !actions.is_empty() || running > 0 {
        return actions;
    }
    let members: Vec<NodeId> = dir.nodes.values().filter(|n| n.state != NodeState::Removed).map(|n| n.id).collect();
    if members.iter().any(|n| !v.up(*n)) {
        return actions;
    }
    let active: Vec<NodeId> = dir.nodes.values().filter(|n| n.state == NodeState::Active).map(|n| n.id).collect();

    // 3: replica counts.
    if let (Some(full), Some(empty)) = (
        active.iter().max_by_key(|n| (v.counts[n], std::cmp::Reverse(**n))),
        active.iter().min_by_key(|n| (v.counts[n], **n)),
    ) {
        if v.counts[full] > v.counts[empty] + policy.slack && budget > 0 {
            // A data shard (not the metadata group) on the fullest node and
            // not on the emptiest; one it does not lead if possible.
            let mut choices: Vec<&ShardDescriptor> = dir
                .shards
                .values()
                .filter(|g| g.replica_on(*full).is_some() && g.replica_on(*empty).is_none() && !v.busy(g.shard_id))
                .collect();
            choices.sort_by_key(|g| (leaders.get(&g.shard_id) == Some(full), g.shard_id));
            if let Some(g) = choices.first() {
                actions.push(Action::Move { shard: g.shard_id, from: *full, to: *empty, reason: "balance" });
                return actions;
            }
        }
    }

    // 4: leader counts, over nodes that hold replicas.
    let mut led: BTreeMap<NodeId, usize> = active.iter().map(|n| (*n, 0)).collect();
    for (g, n) in leaders {
        if dir.group(*g).is_some() {
            if let Some(c) = led.get_mut(n) {
                *c += 1;
            }
        }
    }
    let mut by_load: Vec<(usize, NodeId)> = led.iter().map(|(n, c)| (*c, *n)).collect();
    by_load.sort();
    let Some(&(most, heavy)) = by_load.last() else { return actions };
    for &(fewest, light) in &by_load {
        if most <= fewest + policy.slack {
            break;
        }
        // Data shards only: the metadata leader's heartbeat tracker is in
        // memory, so moving that leadership for balance would cost a round
        // of liveness knowledge for nothing.
        let pick = dir
            .shards
            .values()
            .find(|g| leaders.get(&g.shard_id) == Some(&heavy) && g.replica_on(light).is_some() && !v.busy(g.shard_id));
        if let Some(g) = pick {
            actions.push(Action::TransferLeader { shard: g.shard_id, to: light });
            break;
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleave_metadata::{MetaCommand, MetaResponse, Phase};

    fn policy() -> BalancePolicy {
        BalancePolicy { node_dead_after: Duration::from_secs(60), max_moves: 2, balance: true, slack: 1 }
    }

    fn cluster(nodes: u64) -> Directory {
        let mut d = Directory::bootstrap(&[(1, "a".into()), (2, "b".into()), (3, "c".into())], 3);
        for n in 4..=nodes {
            d.apply(&MetaCommand::RegisterNode { node_id: Some(n), raft_addr: format!("x{n}"), api_addr: None })
                .unwrap();
        }
        d
    }

    fn up(d: &Directory) -> Vec<NodeHealth> {
        d.nodes.keys().map(|id| NodeHealth { id: *id, up: true, silent_for: Duration::ZERO }).collect()
    }

    fn leaders(pairs: &[(u64, u64)]) -> HashMap<u64, u64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn a_dead_node_is_healed_only_after_node_dead_after() {
        let d = cluster(4);
        let mut h = up(&d);
        h[2] = NodeHealth { id: 3, up: false, silent_for: Duration::from_secs(30) };
        let l = leaders(&[(0, 1), (1, 2)]);
        assert!(
            plan(&d, &h, &l, &Missing::new(), &policy()).is_empty(),
            "suspect only: wait, and do not balance either"
        );
        h[2].silent_for = Duration::from_secs(61);
        let a = plan(&d, &h, &l, &Missing::new(), &policy());
        assert_eq!(
            a,
            vec![
                Action::Move { shard: 0, from: 3, to: 4, reason: "heal" },
                Action::Move { shard: 1, from: 3, to: 4, reason: "heal" },
            ]
        );
    }

    #[test]
    fn moves_are_rate_limited_and_one_per_group() {
        let d = cluster(4);
        let mut h = up(&d);
        h[2] = NodeHealth { id: 3, up: false, silent_for: Duration::from_secs(61) };
        let p = BalancePolicy { max_moves: 1, ..policy() };
        assert_eq!(plan(&d, &h, &leaders(&[]), &Missing::new(), &p).len(), 1);
        let mut d2 = d.clone();
        d2.apply(&MetaCommand::PlanMove { shard_id: 0, from_node: 3, to_node: 4, reason: "heal".into(), now_ms: 0 })
            .unwrap();
        let a = plan(&d2, &h, &leaders(&[]), &Missing::new(), &policy());
        assert_eq!(a, vec![Action::Move { shard: 1, from: 3, to: 4, reason: "heal" }], "group 0 is busy");
    }

    #[test]
    fn decommissioning_moves_everything_then_removes_the_node() {
        let mut d = cluster(4);
        d.apply(&MetaCommand::SetNodeState { node_id: 2, state: NodeState::Decommissioning }).unwrap();
        let a = plan(&d, &up(&d), &leaders(&[]), &Missing::new(), &policy());
        assert_eq!(
            a,
            vec![
                Action::Move { shard: 0, from: 2, to: 4, reason: "decommission" },
                Action::Move { shard: 1, from: 2, to: 4, reason: "decommission" },
            ]
        );
        for shard in [0, 1] {
            let op = match d
                .apply(&MetaCommand::PlanMove {
                    shard_id: shard,
                    from_node: 2,
                    to_node: 4,
                    reason: "decommission".into(),
                    now_ms: 0,
                })
                .unwrap()
            {
                MetaResponse::Op(op) => op,
                other => panic!("{other:?}"),
            };
            for (from, to) in
                [(Phase::Planned, Phase::Created), (Phase::Created, Phase::Learning), (Phase::Learning, Phase::Joint)]
            {
                d.apply(&MetaCommand::AdvanceOp { op_id: op, from, to, now_ms: 0 }).unwrap();
            }
            d.apply(&MetaCommand::CommitMove { op_id: op, now_ms: 0 }).unwrap();
            d.apply(&MetaCommand::FinishOp { op_id: op, write_pause_ms: None, now_ms: 0 }).unwrap();
        }
        assert_eq!(plan(&d, &up(&d), &leaders(&[]), &Missing::new(), &policy()), vec![Action::MarkRemoved { node: 2 }]);
    }

    #[test]
    fn a_new_node_gets_replicas_then_leaders_and_the_plan_settles() {
        let mut d = cluster(3);
        // five shards on nodes 1-3 (as splits would leave them)
        for s in 2..=5 {
            let replicas = d.shards[&1].replicas.clone();
            d.shards.insert(s, ShardDescriptor { shard_id: s, replicas, conf_version: 1 });
        }
        d.apply(&MetaCommand::RegisterNode { node_id: Some(4), raft_addr: "x4".into(), api_addr: None }).unwrap();
        let mut l = leaders(&[(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
        let mut moves = 0;
        loop {
            let a = plan(&d, &up(&d), &l, &Missing::new(), &policy());
            let Some(first) = a.first().cloned() else { break };
            match first {
                Action::Move { shard, from, to, reason } => {
                    assert_eq!(reason, "balance");
                    assert_eq!(to, 4);
                    let g = d.shards.get_mut(&shard).unwrap();
                    g.replicas.iter_mut().find(|r| r.node_id == from).unwrap().node_id = to;
                    moves += 1;
                }
                Action::TransferLeader { shard, to } => {
                    l.insert(shard, to);
                }
                other => panic!("{other:?}"),
            }
            assert!(moves < 10, "settles");
        }
        let counts: Vec<usize> = (1..=4).map(|n| d.replica_count(n)).collect();
        assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "{counts:?}");
        assert!(d.replica_count(4) >= 4);
        let mut led = [0usize; 5];
        for n in l.values() {
            led[*n as usize] += 1;
        }
        assert!(led[4] >= 1, "node 4 leads something: {led:?}");
        assert!(led[1..].iter().max().unwrap() - led[1..].iter().min().unwrap() <= 1, "{led:?}");
    }

    #[test]
    fn a_replica_missing_from_a_live_nodes_reports_is_replaced() {
        let d = cluster(4);
        let r3 = d.shards[&1].replica_on(3).unwrap().replica_id;
        // Node 3 heartbeats but holds only the metadata group.
        let meta3 = d.meta.as_ref().unwrap().replica_on(3).unwrap().replica_id;
        assert_eq!(missing_on(&d, 3, &[(0, meta3)]), vec![1]);
        assert_eq!(missing_on(&d, 3, &[(0, meta3), (1, r3)]), Vec::<u64>::new());
        assert_eq!(missing_on(&d, 3, &[(0, meta3), (1, r3 + 100)]), vec![1], "another replica id is not it");
        let l = leaders(&[(0, 1), (1, 2)]);
        let mut m = Missing::new();
        m.insert((1, 3), Duration::from_secs(5));
        let off = BalancePolicy { balance: false, ..policy() };
        assert!(plan(&d, &up(&d), &l, &m, &off).is_empty(), "missing only for a moment");
        m.insert((1, 3), Duration::from_secs(60));
        assert_eq!(plan(&d, &up(&d), &l, &m, &off), vec![Action::Move { shard: 1, from: 3, to: 4, reason: "heal" }]);
    }

    #[test]
    fn balanced_clusters_are_left_alone() {
        let d = cluster(3);
        assert!(plan(&d, &up(&d), &leaders(&[(0, 1), (1, 2)]), &Missing::new(), &policy()).is_empty());
        let off = BalancePolicy { balance: false, ..policy() };
        let d4 = cluster(4);
        assert!(plan(&d4, &up(&d4), &leaders(&[(0, 1), (1, 1)]), &Missing::new(), &off).is_empty());
    }
}
