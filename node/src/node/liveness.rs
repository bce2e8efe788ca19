//! Node-level liveness: one ping per pair of nodes, not one heartbeat per
//! group — and failover of the groups whose leader was on a node that died.
//!
//! Quiet groups send no Raft heartbeats and their replicas run no election
//! timers (`raft::quiesce`), so something else must notice a dead leader.
//! Every node pings every other node of the directory every [`PING_EVERY`]
//! (CockroachDB's *store liveness* does the same job). A peer that has not
//! answered for [`DEAD_AFTER`] is dead: a kill -9 refuses the connection at
//! once, a host that vanished stops answering. A pong also names the groups
//! whose replica on that node a storage error stopped.
//!
//! Failover ([`failover_pass`]): for every local replica whose known leader
//! is on a dead node (or is a failed replica), the surviving voters stand
//! for election in a fixed order ([`raft::quiesce::failover_rank`]): the
//! first at once, the next a second later if no leader emerged, and so on,
//! so they do not split the vote. A replica campaigns only once it has not
//! heard from that leader for the leader lease (`GroupRaft::campaign`).
//! A pass makes at most [`CAMPAIGNS_PER_PASS`] groups campaign, and none
//! while this node hears from less than a majority of the nodes: a node
//! that stalled (and so missed everyone's pongs) must not stand in every
//! group at once when it wakes.
//!
//! A peer that comes back wakes the quiet groups this node leads with a
//! member there, so their leaders bring it up to date.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cleave_metadata::NodeId;
use openraft::ServerState;

use super::Node;
use crate::raft::quiesce::failover_rank;
use crate::rpc::{Ping, Pong};

/// How often every peer is pinged.
pub const PING_EVERY: Duration = Duration::from_millis(100);
/// A peer that has not answered a ping for this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_millis(600);
/// How long a ping may take.
const PING_TIMEOUT: Duration = Duration::from_millis(400);
/// The wait before the next voter in order campaigns.
const NEXT_CANDIDATE_AFTER: Duration = Duration::from_secs(1);
/// Most groups one failover pass makes campaign (see [`failover_pass`]).
const CAMPAIGNS_PER_PASS: usize = 128;
/// The failover pass runs every ping round for this long after a node
/// died, then once a second (a node that stays dead keeps its groups'
/// remaining members waiting only until the balancer replaces it).
const FAST_PASSES_FOR: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Peer {
    /// The last answer (or when the peer was first seen, before any).
    last_heard: Instant,
    answered: bool,
    dead: bool,
    failed: Vec<u64>,
}

/// What this node knows of its peers' liveness. Unknown nodes count as live.
#[derive(Default)]
pub struct Liveness {
    peers: Mutex<HashMap<NodeId, Peer>>,
    /// Groups in failover here: group → when it was first seen leaderless.
    failing: Mutex<HashMap<u64, Instant>>,
    /// A failover pass is running.
    passing: std::sync::atomic::AtomicBool,
}

/// What one ping round changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub died: Vec<NodeId>,
    pub revived: Vec<NodeId>,
}

impl Liveness {
    /// Whether `node` is up as far as this node knows.
    pub fn is_live(&self, node: NodeId) -> bool {
        self.peers.lock().unwrap().get(&node).is_none_or(|p| !p.dead)
    }

    /// Whether `group`'s replica on `node` is out of service: the node is
    /// dead, or reported the replica failed.
    pub fn replica_down(&self, node: NodeId, group: u64) -> bool {
        self.peers.lock().unwrap().get(&node).is_some_and(|p| p.dead || p.failed.contains(&group))
    }

    /// Whether any peer is dead or reports a failed replica.
    fn anything_down(&self) -> bool {
        self.peers.lock().unwrap().values().any(|p| p.dead || !p.failed.is_empty())
    }

    /// Whether this node and the peers it hears from are a majority of the
    /// nodes it pings. When they are not, the likelier story is that this
    /// node is the one cut off or stalled (it stopped hearing everyone at
    /// once): its campaigns could not win, and a node that comes back from
    /// a stall would otherwise stand in every group at once (seen at 9,835
    /// shards: a storm of elections that never settled).
    pub fn quorum_in_sight(&self) -> bool {
        let peers = self.peers.lock().unwrap();
        let live = 1 + peers.values().filter(|p| !p.dead).count();
        2 * live > 1 + peers.len()
    }

    /// Records the answers of one ping round to the peers in `answers`
    /// (`None`: no answer) at `now`; peers no longer pinged are forgotten.
    pub fn record(&self, now: Instant, answers: &BTreeMap<NodeId, Option<Pong>>) -> Changes {
        let mut peers = self.peers.lock().unwrap();
        peers.retain(|n, _| answers.contains_key(n));
        let mut changes = Changes::default();
        for (node, answer) in answers {
            let p =
                peers.entry(*node).or_insert(Peer { last_heard: now, answered: false, dead: false, failed: vec![] });
            match answer {
                Some(pong) => {
                    p.last_heard = now;
                    p.answered = true;
                    p.failed.clone_from(&pong.failed);
                    if p.dead {
                        p.dead = false;
                        changes.revived.push(*node);
                    }
                }
                None if !p.dead && now.duration_since(p.last_heard) >= DEAD_AFTER => {
                    p.dead = true;
                    changes.died.push(*node);
                }
                None => {}
            }
        }
        changes
    }
}

/// Pings every peer every [`PING_EVERY`], forever; runs the failover of
/// groups whose leader is down and wakes groups with a member that came back.
pub async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(PING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_death: Option<Instant> = None;
    let mut last_slow_pass = Instant::now();
    loop {
        tick.tick().await;
        let peers: Vec<NodeId> = node.directory().nodes.keys().copied().filter(|n| *n != node.id()).collect();
        let pings = peers.iter().map(|&peer| {
            let node = node.clone();
            async move {
                let addr = node.dir_cache().raft_addr_of(&node.directory(), peer)?;
                let ping = Ping { from: node.id() };
                node.router().call(&addr, ping, PING_TIMEOUT).await.ok().map(Some).unwrap_or(None)
            }
        });
        let answers: BTreeMap<NodeId, Option<Pong>> =
            peers.iter().copied().zip(futures::future::join_all(pings).await).collect();
        let changes = node.liveness().record(Instant::now(), &answers);
        for n in &changes.died {
            tracing::info!(node = n, "peer node is down (no answer to pings for {DEAD_AFTER:?})");
            last_death = Some(Instant::now());
        }
        if !changes.revived.is_empty() {
            tracing::info!(nodes = ?changes.revived, "peer nodes are up again");
            wake_groups_with_members_on(&node, &changes.revived);
        }
        if node.liveness().anything_down() {
            let fast = last_death.is_some_and(|t| t.elapsed() < FAST_PASSES_FOR);
            let idle = !node.liveness().passing.swap(true, std::sync::atomic::Ordering::SeqCst);
            if idle && (fast || last_slow_pass.elapsed() >= Duration::from_secs(1)) {
                last_slow_pass = Instant::now();
                // Its own task: a long pass over many groups never delays pings.
                let node = node.clone();
                tokio::spawn(async move {
                    /// Clears `passing` however the pass ends (a panic too).
                    struct Done<'a>(&'a std::sync::atomic::AtomicBool);
                    impl Drop for Done<'_> {
                        fn drop(&mut self) {
                            self.0.store(false, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                    let _done = Done(&node.liveness().passing);
                    failover_pass(&node).await;
                });
            } else if idle {
                node.liveness().passing.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        } else {
            node.liveness().failing.lock().unwrap().clear();
        }
    }
}

/// Wakes the quiet groups this node leads that have a member on one of `nodes`.
fn wake_groups_with_members_on(node: &Node, nodes: &[NodeId]) {
    for g in node.groups().in_service() {
        if g.is_quiet() && {
            let s = g.status();
            s.is_leader && s.members.values().any(|n| nodes.contains(n))
        } {
            tokio::spawn(async move { g.rouse().await });
        }
    }
}

/// One failover pass over the local replicas (see the module).
pub async fn failover_pass(node: &Node) {
    let lease_ms = node.ctx().settings.election_timeout_ms * 2;
    let liveness = node.liveness();
    if !liveness.quorum_in_sight() {
        tracing::debug!("failover: most peers look down, no campaign from here");
        return;
    }
    // Campaigns per pass (a pass runs every ping round while a death is
    // fresh): a node with thousands of groups led by the dead node stands
    // in them a batch at a time, not all at once.
    let mut budget = CAMPAIGNS_PER_PASS;
    let mut still_failing = HashSet::new();
    for g in node.groups().in_service() {
        // The metadata group is always awake: openraft's own timers (with
        // pre-vote) elect its leaders.
        if g.group == cleave_metadata::META_GROUP {
            continue;
        }
        let (leader, state) = g.known_leader();
        if state == ServerState::Leader || state == ServerState::Learner {
            continue;
        }
        let first = {
            let mut failing = liveness.failing.lock().unwrap();
            let leader_down = leader.is_some_and(|(_, n)| liveness.replica_down(n, g.group));
            // Leaderless after a campaign of ours: keep at it.
            let still_electing = leader.is_none() && failing.contains_key(&g.group);
            if !leader_down && !still_electing {
                continue;
            }
            *failing.entry(g.group).or_insert_with(Instant::now)
        };
        still_failing.insert(g.group);
        // Candidates: the voters whose replica is in service (the down
        // leader's is not: its node is down or reports it failed).
        let voters = g.voter_nodes();
        let Some(rank) = failover_rank(&voters, g.replica_id, |n| !liveness.replica_down(n, g.group)) else {
            continue;
        };
        if budget == 0 || first.elapsed() < NEXT_CANDIDATE_AFTER * rank as u32 {
            continue;
        }
        if g.campaign(lease_ms).await {
            budget -= 1;
            tracing::info!(group = g.group, rank, "leader's node is down: campaigning");
        }
    }
    liveness.failing.lock().unwrap().retain(|g, _| still_failing.contains(g));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(list: &[(NodeId, bool)]) -> BTreeMap<NodeId, Option<Pong>> {
        list.iter().map(|(n, up)| (*n, up.then(Pong::default))).collect()
    }

    #[test]
    fn a_peer_is_dead_only_after_missing_pings_for_the_dead_after_time() {
        let l = Liveness::default();
        let t0 = Instant::now();
        assert_eq!(l.record(t0, &answers(&[(2, true), (3, true)])), Changes::default());
        // Node 3 stops answering: still live until DEAD_AFTER has passed.
        let early = l.record(t0 + DEAD_AFTER / 2, &answers(&[(2, true), (3, false)]));
        assert!(early.died.is_empty());
        assert!(l.is_live(3));
        let late = l.record(t0 + DEAD_AFTER, &answers(&[(2, true), (3, false)]));
        assert_eq!(late.died, vec![3]);
        assert!(!l.is_live(3) && l.is_live(2));
        assert!(l.replica_down(3, 7));
        // Reported once, then it answers again: revived.
        assert!(l.record(t0 + DEAD_AFTER * 2, &answers(&[(2, true), (3, false)])).died.is_empty());
        assert_eq!(l.record(t0 + DEAD_AFTER * 3, &answers(&[(2, true), (3, true)])).revived, vec![3]);
        assert!(l.is_live(3));
        assert!(l.is_live(9), "a node never pinged counts as live");
    }

    #[test]
    fn a_pong_naming_a_failed_replica_puts_that_replica_down_only() {
        let l = Liveness::default();
        let pong = Pong { failed: vec![7] };
        l.record(Instant::now(), &BTreeMap::from([(2, Some(pong))]));
        assert!(l.is_live(2));
        assert!(l.replica_down(2, 7));
        assert!(!l.replica_down(2, 8));
        assert!(l.anything_down());
    }

    #[test]
    fn a_node_that_stops_hearing_most_peers_sees_no_quorum() {
        let l = Liveness::default();
        let t0 = Instant::now();
        assert!(l.quorum_in_sight(), "no peers known: alone, a majority of one");
        l.record(t0, &answers(&[(2, true), (3, true)]));
        assert!(l.quorum_in_sight());
        l.record(t0 + DEAD_AFTER, &answers(&[(2, true), (3, false)]));
        assert!(l.quorum_in_sight(), "one of three down: the other two are a majority");
        l.record(t0 + DEAD_AFTER * 2, &answers(&[(2, false), (3, false)]));
        assert!(!l.quorum_in_sight(), "every peer down at once: this node is the likelier culprit");
        // Five nodes: two down still leaves three of five.
        let l = Liveness::default();
        l.record(t0, &answers(&[(2, true), (3, true), (4, true), (5, true)]));
        l.record(t0 + DEAD_AFTER, &answers(&[(2, true), (3, true), (4, false), (5, false)]));
        assert!(l.quorum_in_sight());
        l.record(t0 + DEAD_AFTER * 2, &answers(&[(2, true), (3, false), (4, false), (5, false)]));
        assert!(!l.quorum_in_sight());
    }

    #[test]
    fn a_peer_that_never_answered_dies_after_the_dead_after_time() {
        let l = Liveness::default();
        let t0 = Instant::now();
        assert!(l.record(t0, &answers(&[(4, false)])).died.is_empty());
        assert_eq!(l.record(t0 + DEAD_AFTER, &answers(&[(4, false)])).died, vec![4]);
    }
}
