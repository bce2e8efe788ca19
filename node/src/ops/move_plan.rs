//! The next membership step of a replica move, decided from what the group's
//! leader reports. Pure: the driver ([`super::moves`]) observes the group,
//! asks [`forward`] (or [`revert`] for an aborted move) what to do, does it,
//! and observes again. Because the decision depends only on the observed
//! configuration, a driver that restarts anywhere — after a crash, on a new
//! metadata leader, with the group half way through a joint configuration —
//! picks up exactly where the group stands.

use std::collections::BTreeSet;

use cleave_metadata::ReplicaId;

use crate::raft::membership::MembershipView;

/// A learner may be promoted once it lacks at most this many entries.
pub const MAX_LAG: u64 = 64;

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The previous configuration change is not committed yet.
    WaitCommit,
    AddLearner,
    /// The learner is still catching up (`lag` entries behind, if known).
    WaitCatchUp {
        lag: Option<u64>,
    },
    /// The replica being removed leads: hand leadership to `to` first.
    TransferLeader {
        to: ReplicaId,
    },
    EnterJoint,
    /// Make `voters` the uniform configuration (flatten or revert a joint one).
    ChangeVoters {
        voters: BTreeSet<ReplicaId>,
    },
    RemoveLearner,
    /// The group is where the move (or its revert) wants it.
    Done,
}

/// The best voter other than `from` to lead: the most caught-up one.
fn successor(view: &MembershipView, voters: &BTreeSet<ReplicaId>, from: ReplicaId) -> Option<ReplicaId> {
    voters.iter().filter(|r| **r != from).max_by_key(|r| (view.lag(**r).map(|l| u64::MAX - l), **r)).copied()
}

/// Whether the replica being removed is the one leading.
fn from_leads(view: &MembershipView, from: ReplicaId) -> bool {
    view.is_leader && view.replica_id == from
}

/// Next step of a move replacing voter `from` with `to`.
pub fn forward(view: &MembershipView, from: ReplicaId, to: ReplicaId) -> Step {
    if !view.committed {
        return Step::WaitCommit;
    }
    let voters = view.voters();
    if !view.is_joint() && voters.contains(&to) && !voters.contains(&from) {
        return Step::Done;
    }
    if !view.nodes.contains_key(&to) {
        return Step::AddLearner;
    }
    if !view.is_joint() && !voters.contains(&to) {
        match view.lag(to) {
            Some(lag) if lag <= MAX_LAG => {}
            lag => return Step::WaitCatchUp { lag },
        }
    }
    if from_leads(view, from) {
        // In a joint configuration `to` votes too and may take over.
        let mut candidates = voters.clone();
        if view.is_joint() {
            candidates.insert(to);
        }
        if let Some(next) = successor(view, &candidates, from) {
            return Step::TransferLeader { to: next };
        }
    }
    if !view.is_joint() && voters.contains(&from) && !voters.contains(&to) {
        return Step::EnterJoint;
    }
    let mut goal = voters;
    goal.insert(to);
    goal.remove(&from);
    Step::ChangeVoters { voters: goal }
}

/// Next step of undoing an aborted move: back to the voters without `to`,
/// and `to` no longer a member.
pub fn revert(view: &MembershipView, from: ReplicaId, to: ReplicaId) -> Step {
    if !view.committed {
        return Step::WaitCommit;
    }
    let voters = view.voters();
    if view.is_joint() || voters.contains(&to) {
        let mut goal = voters;
        goal.remove(&to);
        goal.insert(from);
        return Step::ChangeVoters { voters: goal };
    }
    if view.nodes.contains_key(&to) {
        return Step::RemoveLearner;
    }
    Step::Done
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Replicas 1, 2, 3 on nodes 1, 2, 3; the move replaces 1 with 4.
    fn view(configs: &[&[u64]], learners: &[u64], leader: u64) -> MembershipView {
        let configs: Vec<BTreeSet<u64>> = configs.iter().map(|c| c.iter().copied().collect()).collect();
        let mut nodes: BTreeMap<u64, u64> = configs.iter().flatten().map(|r| (*r, *r)).collect();
        nodes.extend(learners.iter().map(|r| (*r, *r)));
        let matched = nodes.keys().filter(|r| **r != leader).map(|r| (*r, 100)).collect();
        MembershipView {
            replica_id: leader,
            is_leader: true,
            leader: Some(leader),
            configs,
            nodes,
            committed: true,
            last_log_index: Some(100),
            matched,
            config_id: None,
        }
    }

    fn set(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    #[test]
    fn a_move_walks_learner_joint_uniform() {
        let v = view(&[&[1, 2, 3]], &[], 2);
        assert_eq!(forward(&v, 1, 4), Step::AddLearner);
        let mut v = view(&[&[1, 2, 3]], &[4], 2);
        v.matched.insert(4, 10);
        assert_eq!(forward(&v, 1, 4), Step::WaitCatchUp { lag: Some(90) });
        v.matched.insert(4, 100 - MAX_LAG);
        assert_eq!(forward(&v, 1, 4), Step::EnterJoint);
        let v = view(&[&[1, 2, 3], &[2, 3, 4]], &[], 2);
        assert_eq!(forward(&v, 1, 4), Step::ChangeVoters { voters: set(&[2, 3, 4]) });
        let v = view(&[&[2, 3, 4]], &[], 2);
        assert_eq!(forward(&v, 1, 4), Step::Done);
    }

    #[test]
    fn the_leaving_replica_hands_over_leadership_first() {
        let mut v = view(&[&[1, 2, 3]], &[4], 1);
        v.matched.insert(2, 90);
        assert_eq!(forward(&v, 1, 4), Step::TransferLeader { to: 3 }, "the most caught-up other voter");
        let v = view(&[&[1, 2, 3], &[2, 3, 4]], &[], 1);
        assert!(matches!(forward(&v, 1, 4), Step::TransferLeader { to } if to != 1));
        // a follower that is being removed does not matter
        let v = view(&[&[1, 2, 3]], &[4], 3);
        assert_eq!(forward(&v, 1, 4), Step::EnterJoint);
    }

    #[test]
    fn a_leftover_joint_configuration_is_finished_or_reverted() {
        let v = view(&[&[1, 2, 3], &[2, 3, 4]], &[], 3);
        assert_eq!(forward(&v, 1, 4), Step::ChangeVoters { voters: set(&[2, 3, 4]) });
        assert_eq!(revert(&v, 1, 4), Step::ChangeVoters { voters: set(&[1, 2, 3]) });
        let v = view(&[&[1, 2, 3]], &[4], 3);
        assert_eq!(revert(&v, 1, 4), Step::RemoveLearner);
        let v = view(&[&[1, 2, 3]], &[], 3);
        assert_eq!(revert(&v, 1, 4), Step::Done);
    }

    #[test]
    fn nothing_happens_over_an_uncommitted_change() {
        let mut v = view(&[&[1, 2, 3], &[2, 3, 4]], &[], 3);
        v.committed = false;
        assert_eq!(forward(&v, 1, 4), Step::WaitCommit);
        assert_eq!(revert(&v, 1, 4), Step::WaitCommit);
    }

    #[test]
    fn a_learner_with_unknown_progress_is_not_promoted() {
        let mut v = view(&[&[1, 2, 3]], &[4], 2);
        v.matched.remove(&4);
        assert_eq!(forward(&v, 1, 4), Step::WaitCatchUp { lag: None });
    }
}
