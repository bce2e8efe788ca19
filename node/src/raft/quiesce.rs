//! Quiescence: an idle group stops costing anything.
//!
//! An awake openraft replica wakes its core every tick (a fifth of the
//! heartbeat interval), and a leader heartbeats every follower every
//! heartbeat interval, whether or not anything happens. With thousands of
//! groups per node that alone eats the CPU (TiKV's *hibernate regions* and
//! CockroachDB's *quiescence* answer the same problem). A quiet replica has
//! openraft's tick switched off (`runtime_config().tick(false)`; a quiet
//! leader also stops heartbeats): its tasks all park, so it costs no CPU
//! and touches no memory until something happens to it.
//!
//! **Going quiet** is the leader's decision, taken by the node's quiescer
//! (`node::quiescer`) for a group with no client or management activity for
//! a while ([`QUIESCE_AFTER`]) whose log is committed and applied, whose
//! configuration is uniform and committed, and whose every follower on a
//! live node has matched the whole log. The leader then asks each such
//! follower to go quiet ([`Quiesce`]); a follower agrees only if its *own*
//! state shows the same vote, the same leader and the same last log id,
//! applied ([`GroupRaft::quiesce_follower`]), so a follower that missed an
//! entry or a commit refuses and the leader retries later. With every ack
//! in, the leader goes quiet itself — unless anything happened meanwhile
//! (the mode left `Quiescing`).
//!
//! **Waking** is immediate and local: a proposal, a read barrier or a
//! membership step at the leader ([`GroupRaft::wake`]), entries or a
//! snapshot arriving at a follower, a leadership transfer from the current
//! leader, a replica becoming leader. A woken leader's quorum-ack lease has
//! lapsed and openraft refuses writes without one, so before a proposal it
//! runs one read-index round ([`GroupRaft::wake_for_write`]): the first
//! request pays one round trip more. Its entries then wake the followers.
//!
//! **Failover** does not rely on timers of quiet replicas (they have none):
//! node-level liveness (`node::liveness`) tells which nodes died, and for
//! every group whose leader was there one surviving voter campaigns at once
//! ([`GroupRaft::campaign`]) — but only after it has not heard from that
//! leader for `election_timeout_max`, the lease openraft's voters grant a
//! leader, so a triggered election is one openraft itself would allow and
//! the leader-lease assumptions (the metadata leader's confirmation cache)
//! keep holding.
//!
//! The metadata group never goes quiet (its leader's confirmation relies on
//! heartbeats).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use cleave_metadata::{NodeId, ReplicaId};
use openraft::alias::{LogIdOf, VoteOf};
use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;
use serde::{Deserialize, Serialize};

use super::instance::{Metrics, RaftHandle};
use super::{GroupRaft, SmState, TypeConfig};

/// A group without activity for this long may go quiet (longer than the
/// leader lease, so a group quiesced is one whose voters' leases lapse
/// soon after — a triggered failover election then wins at once).
pub const QUIESCE_AFTER: Duration = Duration::from_secs(2);

/// Milliseconds on the process's monotonic clock.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

const AWAKE: u8 = 0;
const QUIESCING: u8 = 1;
const QUIET: u8 = 2;
/// Quiet, having gone quiet as the group's leader.
const QUIET_LEADER: u8 = 3;

/// The groups of a node that may be awake: every awake replica's group is
/// in it (a replica adds its group when it wakes, under its `switch`, after
/// the mode changed), and [`AwakeSet::awake`] drops the ones it finds quiet
/// (under the set's lock, so a wake that races with it adds its group
/// again). Loops over the awake replicas (the quiescer four times a
/// second, the split forwarder supervisor fifty) then cost nothing per
/// quiet replica: a walk over ten thousand replicas that fifty times a
/// second was the largest idle cost at 9,000 shards.
#[derive(Default)]
pub struct AwakeSet {
    ids: Mutex<std::collections::HashSet<u64>>,
}

impl AwakeSet {
    /// Lists `group` (a replica of it is awake, or may be).
    pub fn insert(&self, group: u64) {
        self.ids.lock().unwrap().insert(group);
    }

    /// The groups whose replica `get` finds awake; groups `get` does not
    /// know or finds quiet are dropped (a replica is listed again when it
    /// wakes, or when it is added to the node's map awake).
    pub fn awake<T>(&self, get: impl Fn(u64) -> Option<(T, bool)>) -> Vec<T> {
        let mut ids = self.ids.lock().unwrap();
        let mut out = Vec::new();
        ids.retain(|id| match get(*id) {
            Some((g, true)) => {
                out.push(g);
                true
            }
            _ => false,
        });
        out
    }
}

/// A replica's quiescence state. All fields are atomics so the hot path (a
/// write at an awake leader) pays one load and one store; switching the
/// tick happens under `switch`, so a wake and a sleep never interleave.
pub struct Quiescence {
    /// Where this replica's group is listed while it may be awake.
    set: std::sync::Arc<AwakeSet>,
    group: u64,
    mode: AtomicU8,
    /// Last client or management use at this replica ([`now_ms`]).
    last_activity: AtomicU64,
    /// Last message from the leader this replica follows ([`now_ms`]; 0:
    /// none since it opened).
    last_leader_contact: AtomicU64,
    /// When this replica last stood for election on its own ([`now_ms`]).
    last_campaign: AtomicU64,
    switch: Mutex<()>,
}

/// The leader's request to a follower: go quiet if your state is this.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Quiesce {
    pub leader: ReplicaId,
    pub vote: VoteOf<TypeConfig>,
    /// The leader's last log id; committed and applied.
    pub last_log: Option<LogIdOf<TypeConfig>>,
}

/// A leader's quiescence proposal: what to ask, and whom.
#[derive(Debug, Clone)]
pub struct Proposal {
    pub request: Quiesce,
    /// The followers to ask: replica → node.
    pub ask: Vec<(ReplicaId, NodeId)>,
}

/// Turns `raft`'s tick (and heartbeats) on.
fn tick_on(raft: &RaftHandle) {
    let rc = raft.runtime_config();
    rc.heartbeat(true);
    rc.tick(true);
}

impl Quiescence {
    /// A replica's state at open: quiet (its tick off), or awake (listed
    /// in `set`).
    pub(super) fn new(awake: bool, set: std::sync::Arc<AwakeSet>, group: u64) -> Quiescence {
        if awake {
            set.insert(group);
        }
        Quiescence {
            set,
            group,
            mode: AtomicU8::new(if awake { AWAKE } else { QUIET }),
            last_activity: AtomicU64::default(),
            last_leader_contact: AtomicU64::default(),
            last_campaign: AtomicU64::default(),
            switch: Mutex::default(),
        }
    }

    fn mode(&self) -> u8 {
        self.mode.load(Ordering::SeqCst)
    }

    /// Records activity and turns `raft`'s tick on whatever its role: for a
    /// replica about to campaign (initialising a group, handed leadership,
    /// failing over), whose timer must retry a failed campaign.
    pub(super) fn force_wake(&self, raft: &RaftHandle) {
        self.last_activity.store(now_ms(), Ordering::SeqCst);
        self.wake_quietly(raft);
    }

    /// Wakes `raft` without counting it as activity (a follower receiving
    /// entries: the leader decides when the group is idle).
    fn wake_quietly(&self, raft: &RaftHandle) {
        if self.mode() == AWAKE {
            return;
        }
        let _g = self.switch.lock().unwrap();
        if self.mode.swap(AWAKE, Ordering::SeqCst) != AWAKE {
            self.set.insert(self.group);
            tick_on(raft);
            metrics::counter!("cleave_raft_wakeups_total").increment(1);
        }
    }

    /// A fresh instance replaced a dormant one: it opened quiet, and
    /// openraft restores a leader as leader without telling anyone — the
    /// quiescer's sweep wakes it, as at start-up.
    pub(super) fn reopened(&self) {
        let _g = self.switch.lock().unwrap();
        let _ = self.mode.compare_exchange(QUIET_LEADER, QUIET, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Whether a quiet replica with metrics `m` may drop its instance (see
/// `instance`): settled — its log applied, its configuration uniform and
/// committed, its vote committed — and either the leader that put the
/// group to sleep, or a follower that knows its leader.
fn may_go_dormant(m: &Metrics, went_quiet_as_leader: bool) -> bool {
    let stored = &m.membership_config;
    let settled = m.vote.committed
        && m.last_log_index == m.last_applied.map(|l| l.index)
        && stored.membership().get_joint_config().len() == 1
        && stored.log_id().as_ref() <= m.last_applied.as_ref()
        && m.running_state.is_ok();
    let role = if went_quiet_as_leader {
        m.state == ServerState::Leader
    } else {
        matches!(m.state, ServerState::Follower | ServerState::Learner) && m.current_leader.is_some()
    };
    settled && role
}

impl GroupRaft {
    /// Whether this replica is quiet (its tick is off).
    pub fn is_quiet(&self) -> bool {
        matches!(self.quiescence.mode(), QUIET | QUIET_LEADER)
    }

    /// Records activity and wakes the replica if it leads and is quiet or
    /// on its way there (which aborts the quiescence). Called before every
    /// proposal, read barrier and membership step, so a quiet group serves
    /// them at once. A quiet *follower* stays quiet: its election timer,
    /// switched on long after its leader's last heartbeat, would make it
    /// campaign at the first tick and depose the healthy quiet leader. The
    /// request goes on to the leader, whose entries wake the follower.
    ///
    /// Answers whether it woke a quiet leader: its quorum-ack lease has
    /// lapsed, and openraft refuses a write until a quorum answered again —
    /// see [`Self::wake_for_write`].
    pub(super) fn wake(&self, raft: &RaftHandle) -> bool {
        let q = &self.quiescence;
        // SeqCst, paired with `propose_quiescence`: either it sees this
        // activity, or this sees its `Quiescing`.
        q.last_activity.store(now_ms(), Ordering::SeqCst);
        match q.mode() {
            AWAKE => false,
            QUIESCING => {
                q.wake_quietly(raft);
                false
            }
            _ if raft.metrics().borrow_watched().state == ServerState::Leader => {
                q.wake_quietly(raft);
                true
            }
            _ => false,
        }
    }

    /// Wakes the replica before a proposal. A leader that was quiet has no
    /// valid quorum-ack lease (openraft refuses writes without one), so it
    /// first runs one heartbeat round to a quorum: the first write to a
    /// quiet group pays that one round trip, not a refusal and a retry.
    pub(super) async fn wake_for_write(&self, raft: &RaftHandle) {
        if self.wake(raft) {
            if let Err(e) = raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex).await {
                tracing::debug!(group = self.group, "renewing the lease of a woken leader: {e}");
            }
        }
    }

    /// Records activity and wakes the replica if it leads (see
    /// [`Self::wake`]), reopening it if it was dormant: for a node that came
    /// back, which groups that went quiet without it must bring up to date.
    pub async fn rouse(&self) {
        if let Ok(i) = self.live().await {
            self.wake(&i.raft);
        }
    }

    /// Wakes a follower (entries or a snapshot arrived): it takes up its
    /// election timer again, which starts from the contact just made.
    pub(super) fn wake_follower(&self, raft: &RaftHandle) {
        self.quiescence.wake_quietly(raft);
    }

    /// Records a message from the current leader (see [`Self::ms_since_leader_contact`]).
    pub(super) fn note_leader_contact(&self) {
        self.quiescence.last_leader_contact.store(now_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since this replica last heard from a leader (since it
    /// opened, if never).
    pub fn ms_since_leader_contact(&self) -> u64 {
        now_ms().saturating_sub(self.quiescence.last_leader_contact.load(Ordering::Relaxed))
    }

    /// Milliseconds since the last client or management use here.
    pub fn ms_since_activity(&self) -> u64 {
        now_ms().saturating_sub(self.quiescence.last_activity.load(Ordering::SeqCst))
    }

    /// The leader's side, step 1: if this awake leader may go quiet, marks it
    /// quiescing and answers whom to ask. `live(node)` says whether a node is
    /// up: a follower on a dead node is not asked (nor waited for: the group
    /// wakes when that node comes back).
    pub fn propose_quiescence(&self, live: impl Fn(NodeId) -> bool) -> Option<Proposal> {
        let q = &self.quiescence;
        if self.group == cleave_metadata::META_GROUP
            || q.mode() != AWAKE
            || self.ms_since_activity() < QUIESCE_AFTER.as_millis() as u64
            || self.is_failed()
        {
            return None;
        }
        if let SmState::Shard(s) = &*self.state.read().unwrap() {
            if !s.captures.is_empty() || s.incoming.is_some() {
                return None; // a split in progress: its driver polls the group
            }
        }
        let instance = self.instance.live()?;
        let proposal = {
            let m = instance.raft.metrics();
            let m = m.borrow_watched();
            let stored = &m.membership_config;
            let membership = stored.membership();
            let last_log = m.last_applied;
            let settled = m.state == ServerState::Leader
                && m.vote.committed
                && membership.get_joint_config().len() == 1
                && stored.log_id().as_ref() <= last_log.as_ref()
                && m.last_log_index == last_log.map(|l| l.index)
                && m.cluster_committed == last_log;
            if !settled {
                return None;
            }
            let replication = m.replication.as_ref()?;
            let mut ask = Vec::new();
            for (r, n) in membership.nodes() {
                if *r == self.replica_id {
                    continue;
                }
                if !live(n.node_id) {
                    continue;
                }
                if replication.get(r).cloned().flatten() != last_log {
                    return None; // a live member lags: replicate first
                }
                ask.push((*r, n.node_id));
            }
            Proposal { request: Quiesce { leader: self.replica_id, vote: m.vote, last_log }, ask }
        };
        let _g = q.switch.lock().unwrap();
        if q.mode() != AWAKE {
            return None;
        }
        q.mode.store(QUIESCING, Ordering::SeqCst);
        // After the store (see `wake`): a proposal that raced with it aborts.
        if self.ms_since_activity() < QUIESCE_AFTER.as_millis() as u64 {
            q.mode.store(AWAKE, Ordering::SeqCst);
            return None;
        }
        Some(proposal)
    }

    /// The leader's side, step 2: every follower asked agreed; the leader
    /// goes quiet unless anything happened since step 1 (then it is awake
    /// again, or its log moved on). Answers whether it went quiet.
    pub fn complete_quiescence(&self, proposal: &Proposal, all_agreed: bool) -> bool {
        let q = &self.quiescence;
        let _g = q.switch.lock().unwrap();
        if q.mode() != QUIESCING {
            return false;
        }
        let Some(instance) = self.instance.live() else {
            q.mode.store(AWAKE, Ordering::SeqCst);
            return false;
        };
        let unchanged = {
            let m = instance.raft.metrics();
            let m = m.borrow_watched();
            m.state == ServerState::Leader
                && m.vote == proposal.request.vote
                && m.last_applied == proposal.request.last_log
                && m.last_log_index == proposal.request.last_log.map(|l| l.index)
        } && self.ms_since_activity() >= QUIESCE_AFTER.as_millis() as u64;
        if !all_agreed || !unchanged {
            q.mode.store(AWAKE, Ordering::SeqCst);
            return false;
        }
        let rc = instance.raft.runtime_config();
        rc.heartbeat(false);
        rc.tick(false);
        q.mode.store(QUIET_LEADER, Ordering::SeqCst);
        metrics::counter!("cleave_raft_quiesced_total").increment(1);
        true
    }

    /// The follower's side: goes quiet if its own state matches the
    /// leader's request — same vote (term, leader, committed), that leader,
    /// the same last log id, applied, and a uniform committed configuration.
    /// A stale or reordered request, or a follower that lacks an entry or a
    /// commit, answers false.
    pub fn quiesce_follower(&self, req: &Quiesce) -> bool {
        let q = &self.quiescence;
        let _g = q.switch.lock().unwrap();
        let matches = self.with_metrics(|m| {
            let stored = &m.membership_config;
            matches!(m.state, ServerState::Follower | ServerState::Learner)
                && m.vote == req.vote
                && m.vote.committed
                && m.current_leader == Some(req.leader)
                && m.last_applied == req.last_log
                && m.last_log_index == req.last_log.map(|l| l.index)
                && stored.membership().get_joint_config().len() == 1
                && stored.log_id().as_ref() <= m.last_applied.as_ref()
        });
        if !matches {
            return false;
        }
        // A dormant replica is quiet already: nothing to switch off.
        if matches!(q.mode.swap(QUIET, Ordering::SeqCst), AWAKE | QUIESCING) {
            if let Some(i) = self.instance.live() {
                i.raft.runtime_config().tick(false);
            }
        }
        true
    }

    /// The leader this replica knows (replica, node), and whether it is
    /// this replica.
    pub fn known_leader(&self) -> (Option<(ReplicaId, NodeId)>, ServerState) {
        self.with_metrics(|m| {
            let leader =
                m.current_leader.and_then(|l| m.membership_config.membership().get_node(&l).map(|n| (l, n.node_id)));
            (leader, m.state)
        })
    }

    /// The voters of the current configuration (every set while joint):
    /// replica → node.
    pub fn voter_nodes(&self) -> Vec<(ReplicaId, NodeId)> {
        self.with_metrics(|m| {
            let membership = m.membership_config.membership();
            membership.voter_ids().filter_map(|r| membership.get_node(&r).map(|n| (r, n.node_id))).collect()
        })
    }

    /// Stands for election now (failover of a group whose leader's node
    /// died), if this replica has not heard from a leader for the lease
    /// (`election_timeout_max`); wakes it either way, so a failed campaign
    /// is retried by its own timer. Answers whether it campaigned.
    ///
    /// A campaign of its own started less than a lease ago is left to run
    /// (its timer retries it); the campaign asks for pre-votes first, so a
    /// replica that is wrong about its leader's death cannot depose a leader
    /// the other voters still follow.
    pub async fn campaign(&self, lease_ms: u64) -> bool {
        let Ok(i) = self.live().await else { return false };
        let q = &self.quiescence;
        q.force_wake(&i.raft);
        if self.ms_since_leader_contact() <= lease_ms
            || now_ms().saturating_sub(q.last_campaign.load(Ordering::Relaxed)) <= lease_ms
        {
            return false;
        }
        q.last_campaign.store(now_ms(), Ordering::Relaxed);
        match i.raft.trigger().elect(true).await {
            Ok(()) => {
                metrics::counter!("cleave_failover_elections_total").increment(1);
                true
            }
            Err(e) => {
                tracing::debug!(group = self.group, "campaign: {e}");
                false
            }
        }
    }

    /// Wakes this replica if it leads while quiet without having gone quiet
    /// as leader — restored as leader at start-up, say. Answers whether it did.
    pub fn wake_if_leading(&self) -> bool {
        if self.quiescence.mode() != QUIET {
            return false;
        }
        let Some(i) = self.instance.live() else { return false };
        let leads = i.raft.metrics().borrow_watched().state == ServerState::Leader;
        if leads {
            self.quiescence.wake_quietly(&i.raft);
        }
        leads
    }

    /// Wakes this replica if it is a quiet voter that knows no leader and
    /// has heard from none for `2 × lease_ms` (it granted its vote to a
    /// candidate that never won, say): with its timer on, openraft elects
    /// one. Answers whether it did.
    pub fn wake_if_leaderless(&self, lease_ms: u64) -> bool {
        if !self.is_quiet() || self.ms_since_leader_contact() <= 2 * lease_ms {
            return false;
        }
        // A dormant replica knows its leader (see `may_go_dormant`).
        let Some(i) = self.instance.live() else { return false };
        let stranded = {
            let m = i.raft.metrics();
            let m = m.borrow_watched();
            m.current_leader.is_none()
                && m.state != ServerState::Leader
                && m.membership_config.membership().voter_ids().any(|r| r == self.replica_id)
        };
        if stranded {
            self.quiescence.force_wake(&i.raft);
        }
        stranded
    }

    /// Whether this replica looks ready to drop its instance (quiet and
    /// idle for `dormant_after_ms`, not dormant yet): a cheap pre-check of
    /// [`Self::hibernate`].
    fn may_hibernate(&self) -> bool {
        let idle = self.ctx.settings.dormant_after_ms;
        idle > 0
            && self.is_quiet()
            && self.ms_since_activity() >= idle
            && self.ms_since_leader_contact() >= idle
            && !self.is_dormant()
            && !self.is_failed()
    }

    /// Drops this replica's openraft instance if it is quiet, idle for
    /// `dormant_after_ms` and settled, with no split under way and no caller
    /// using it (see `instance`); the next use reopens it. Answers whether it did.
    pub async fn hibernate(&self) -> bool {
        if !self.may_hibernate() {
            return false;
        }
        if let SmState::Shard(s) = &*self.state.read().unwrap() {
            if !s.captures.is_empty() || s.incoming.is_some() {
                return false;
            }
        }
        let q = &self.quiescence;
        self.instance
            .hibernate(|m| {
                // Called with the instance unused (see `InstanceSlot::hibernate`):
                // a wake needs the instance, so the mode cannot change under
                // this look. (Neither the switch nor the state lock is taken:
                // both are taken before the slot elsewhere.) An install under
                // way keeps the instance; should one start regardless — a
                // message openraft had queued — the reopen finishes it (see
                // `Opener::start_instance`).
                !self.is_installing()
                    && match q.mode() {
                        QUIET => may_go_dormant(m, false),
                        QUIET_LEADER => may_go_dormant(m, true),
                        _ => false,
                    }
            })
            .await
    }
}

/// The order in which the surviving voters of a group whose leader died
/// stand for election: the voters on live nodes by replica id. The first
/// campaigns at once; each later one only if no leader emerged a while
/// after the one before it (so they do not split the vote). `None` if
/// `me` is not among them.
pub fn failover_rank(voters: &[(ReplicaId, NodeId)], me: ReplicaId, live: impl Fn(NodeId) -> bool) -> Option<usize> {
    let mut alive: Vec<ReplicaId> = voters.iter().filter(|(_, n)| live(*n)).map(|(r, _)| *r).collect();
    alive.sort_unstable();
    alive.iter().position(|r| *r == me)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_live_voter_campaigns_first() {
        let voters = [(7, 1), (3, 2), (5, 3)];
        let all = |_| true;
        assert_eq!(failover_rank(&voters, 3, all), Some(0));
        assert_eq!(failover_rank(&voters, 5, all), Some(1));
        assert_eq!(failover_rank(&voters, 7, all), Some(2));
        // Node 2 (replica 3) is dead: replica 5 goes first.
        let without_2 = |n| n != 2;
        assert_eq!(failover_rank(&voters, 5, without_2), Some(0));
        assert_eq!(failover_rank(&voters, 7, without_2), Some(1));
        assert_eq!(failover_rank(&voters, 3, without_2), None);
        assert_eq!(failover_rank(&voters, 9, all), None, "a learner never campaigns");
    }

    #[test]
    fn the_clock_moves_forward_from_one() {
        let a = now_ms();
        assert!(a >= 1);
        assert!(now_ms() >= a);
    }
}
