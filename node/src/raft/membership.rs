//! Membership changes of one group, as its leader carries them out.
//!
//! A replica move never changes more than one member at a time and always
//! goes through a learner and a joint configuration, the way TiKV and
//! CockroachDB do it:
//!
//! 1. [`GroupRaft::add_learner`]: the new replica (a fresh id, never a reused
//!    one) receives the log, or a snapshot when the log is purged, without
//!    voting.
//! 2. [`GroupRaft::enter_joint`]: one entry makes the configuration
//!    `{old} ∧ {new}`; from then on every decision needs a majority of both.
//! 3. [`GroupRaft::change_voters`]: flattens it to `{new}` (or back to
//!    `{old}` to revert) and drops members that are no longer voters.
//!
//! Every voter change (`EnterJoint`, `ChangeVoters`, `RemoveLearners`;
//! not `AddLearner` or `TransferLeader`) carries the [`ConfigId`] of the
//! configuration its driver
//! observed (in the [`MembershipView`] it decided from) and is proposed with
//! openraft's `LastMembershipLogId` precondition on exactly that id: a
//! driver that decided from an older configuration — a stale metadata
//! leader's driver, or one whose look predates a later move's joint
//! configuration — is refused at the group's leader, so two drivers can
//! never interleave changes. [`MembershipView`] is what the driver reads to decide
//! the next step; the decision itself is pure (`moves::plan`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use cleave_metadata::{NodeId, ReplicaId};
use openraft::async_runtime::WatchReceiver;
use openraft::entry::RaftPayload;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Membership, Precondition, ServerState};
use serde::{Deserialize, Serialize};

use super::instance::Instance;
use super::{GroupRaft, ReplicaNode, SmState, TypeConfig};

/// Which configuration a view showed: the log id of the membership entry
/// (`None` before any). Opaque outside this module.
pub type ConfigId = Option<openraft::alias::LogIdOf<TypeConfig>>;

/// A group's configuration as one replica (normally the leader) sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct MembershipView {
    /// The replica that answered, and whether it leads.
    pub replica_id: ReplicaId,
    pub is_leader: bool,
    /// The current leader, if known.
    pub leader: Option<ReplicaId>,
    /// Voter sets: one when uniform, two while joint.
    pub configs: Vec<BTreeSet<ReplicaId>>,
    /// Every member, voters and learners: replica → node.
    pub nodes: BTreeMap<ReplicaId, NodeId>,
    /// Whether the configuration above is committed.
    pub committed: bool,
    pub last_log_index: Option<u64>,
    /// Leader only: the highest log index each other member is known to hold.
    pub matched: BTreeMap<ReplicaId, u64>,
    /// The configuration's membership log id: pass it with a change
    /// decided from this view.
    pub config_id: ConfigId,
}

impl MembershipView {
    /// Every voter of every configuration.
    pub fn voters(&self) -> BTreeSet<ReplicaId> {
        self.configs.iter().flatten().copied().collect()
    }

    pub fn is_joint(&self) -> bool {
        self.configs.len() > 1
    }

    /// How many entries `replica` lacks behind the leader's log.
    pub fn lag(&self, replica: ReplicaId) -> Option<u64> {
        let last = self.last_log_index.unwrap_or(0);
        if replica == self.replica_id {
            return Some(0);
        }
        self.matched.get(&replica).map(|m| last.saturating_sub(*m))
    }
}

/// Why a membership step was not taken.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("not the leader")]
    NotLeader { leader: Option<ReplicaNode> },
    /// Deterministic refusals: a precondition failed, a change is in
    /// progress, a member is missing. The caller reads the view again.
    #[error("membership change refused: {0}")]
    Refused(String),
    #[error("raft failure: {0}")]
    Fatal(String),
}

fn write_err(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> MembershipError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            MembershipError::NotLeader { leader: f.leader_node }
        }
        RaftError::APIError(e) => MembershipError::Refused(e.to_string()),
        RaftError::Fatal(e) => MembershipError::Fatal(e.to_string()),
    }
}

/// Refuses a change decided from another configuration than the current one.
fn check_expected(current: ConfigId, expected: ConfigId) -> Result<(), MembershipError> {
    if current == expected {
        Ok(())
    } else {
        Err(MembershipError::Refused(format!(
            "the configuration changed since it was observed (now {current:?}, observed {expected:?})"
        )))
    }
}

impl GroupRaft {
    /// The group's configuration as this replica sees it.
    pub fn membership(&self) -> MembershipView {
        self.with_metrics(|m| {
            let stored = &m.membership_config;
            let membership = stored.membership();
            let committed = m.last_applied.as_ref().is_some_and(|a| stored.log_id().as_ref().is_none_or(|l| l <= a));
            MembershipView {
                replica_id: self.replica_id,
                is_leader: m.state == ServerState::Leader,
                leader: m.current_leader,
                configs: membership.get_joint_config().clone(),
                nodes: membership.nodes().map(|(r, n)| (*r, n.node_id)).collect(),
                committed,
                last_log_index: m.last_log_index,
                matched: m.replication.iter().flatten().map(|(r, l)| (*r, l.as_ref().map_or(0, |l| l.index))).collect(),
                config_id: *stored.log_id(),
            }
        })
    }

    /// Wakes the replica (a membership step is activity) and checks it
    /// leads; answers its instance.
    async fn ensure_leader(&self) -> Result<Arc<Instance>, MembershipError> {
        let i = self.live().await.map_err(|e| MembershipError::Fatal(e.to_string()))?;
        self.wake_for_write(&i.raft).await;
        let s = self.status();
        if s.is_leader {
            Ok(i)
        } else {
            Err(MembershipError::NotLeader { leader: s.leader })
        }
    }

    /// Adds `replica` on `node` as a learner (returns once the entry is
    /// committed; catching up happens in the background).
    pub async fn add_learner(&self, replica: ReplicaId, node: ReplicaNode) -> Result<(), MembershipError> {
        let i = self.ensure_leader().await?;
        self.purge_past_backfill_files(&i).await?;
        i.raft.add_learner(replica, node, false).await.map(|_| ()).map_err(write_err)
    }

    /// A new replica starts from the group's genesis and replays the log,
    /// unless the part it needs was purged (then it is sent a snapshot).
    /// The entry that recorded a split's backfill as files names files only
    /// the replicas of that time staged: a replica added later must never
    /// replay it. So if this shard's log may still hold it, build a snapshot
    /// past it and purge the log up to it before a learner joins.
    async fn purge_past_backfill_files(&self, i: &Instance) -> Result<(), MembershipError> {
        let at = match &*self.state.read().unwrap() {
            SmState::Shard(s) => s.files_at,
            SmState::Meta(_) => None,
        };
        let Some(at) = at else { return Ok(()) };
        let past = |l: &Option<openraft::alias::LogIdOf<TypeConfig>>| l.as_ref().is_some_and(|l| l.index >= at);
        if past(&i.raft.metrics().borrow_watched().purged) {
            return Ok(());
        }
        let wait = Duration::from_secs(30);
        let refused = |what: &str, e: &dyn std::fmt::Display| {
            MembershipError::Refused(format!("{what} past the backfill entry {at}: {e}"))
        };
        if !past(&i.raft.metrics().borrow_watched().snapshot) {
            i.raft.trigger().snapshot().await.map_err(|e| refused("building a snapshot", &e))?;
            i.raft
                .wait(Some(wait))
                .metrics(|m| past(&m.snapshot), "a snapshot past the backfill entry")
                .await
                .map_err(|e| refused("building a snapshot", &e))?;
        }
        i.raft.trigger().purge_log(at).await.map_err(|e| refused("purging the log", &e))?;
        i.raft
            .wait(Some(wait))
            .metrics(|m| past(&m.purged), "the log purged past the backfill entry")
            .await
            .map_err(|e| refused("purging the log", &e))?;
        tracing::info!(group = self.group, at, "log purged past the backfill entry before adding a learner");
        Ok(())
    }

    /// Enters the joint configuration `{old} ∧ {old - from + to}` from the
    /// uniform `{old}`, in one entry, if the configuration is still
    /// `expected`. `to` must already be a learner.
    pub async fn enter_joint(&self, from: ReplicaId, to: ReplicaId, expected: ConfigId) -> Result<(), MembershipError> {
        let i = self.ensure_leader().await?;
        let stored = i.raft.metrics().borrow_watched().membership_config.clone();
        check_expected(*stored.log_id(), expected)?;
        let membership = stored.membership();
        let configs = membership.get_joint_config();
        if configs.len() != 1 {
            return Err(MembershipError::Refused(format!("configuration is joint already: {configs:?}")));
        }
        let old = configs[0].clone();
        let mut new = old.clone();
        new.remove(&from);
        new.insert(to);
        let nodes: BTreeMap<ReplicaId, ReplicaNode> = membership.nodes().map(|(r, n)| (*r, n.clone())).collect();
        let joint = Membership::new(vec![old, new], nodes).map_err(|e| MembershipError::Refused(e.to_string()))?;
        let guard = Precondition::LastMembershipLogId { last_membership_log_id: expected };
        let payload = <openraft::alias::PayloadOf<TypeConfig> as RaftPayload>::blank();
        i.raft.append_membership(joint, payload, [guard]).await.map(|_| ()).map_err(write_err)
    }

    /// Makes `voters` the (uniform) voter set, passing through a joint
    /// configuration when needed; members that are no longer voters are
    /// removed from the group. Only if the configuration is still `expected`.
    pub async fn change_voters(&self, voters: BTreeSet<ReplicaId>, expected: ConfigId) -> Result<(), MembershipError> {
        self.change_if_unchanged(ChangeMembers::ReplaceAllVoters(voters), expected).await
    }

    /// Removes learners from the group, if the configuration is still `expected`.
    pub async fn remove_learners(
        &self,
        learners: BTreeSet<ReplicaId>,
        expected: ConfigId,
    ) -> Result<(), MembershipError> {
        self.change_if_unchanged(ChangeMembers::RemoveNodes(learners), expected).await
    }

    /// Proposes `change` (dropping members that stop being voters) only if
    /// the membership is still `expected`, the one the caller decided from.
    async fn change_if_unchanged(
        &self,
        change: ChangeMembers<ReplicaId, ReplicaNode>,
        expected: ConfigId,
    ) -> Result<(), MembershipError> {
        let i = self.ensure_leader().await?;
        let stored = i.raft.metrics().borrow_watched().membership_config.clone();
        check_expected(*stored.log_id(), expected)?;
        let guard = Precondition::LastMembershipLogId { last_membership_log_id: expected };
        i.raft.change_membership_if(change, false, [guard]).await.map(|_| ()).map_err(write_err)
    }

    /// Asks this leader to hand leadership to voter `to`; the new leader is
    /// elected at once (no election timeout).
    pub async fn transfer_leader(&self, to: ReplicaId) -> Result<(), MembershipError> {
        let i = self.ensure_leader().await?;
        i.raft.trigger().transfer_leader(to).await.map_err(|e| MembershipError::Fatal(e.to_string()))
    }
}
