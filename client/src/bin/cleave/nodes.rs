//! Text rendering of a node's decommission for `cleave decommission`: the
//! progress bar's figures and message, and the lines printed when it starts
//! and ends.
//!
//! A decommissioned node's row in `GET /admin/nodes` goes from status
//! `decommissioning` to `removed` while its replica count falls to 0: the
//! rebalancer moves each replica (one move operation each) to another node,
//! then marks the node removed. Pure functions, so the layout is tested
//! without a cluster.

use std::time::Duration;

use cleave_client::{Liveness, NodeCondition, NodeStatus};

use crate::format::wire_name;

/// How far a decommission got, for the progress bar: its length is the
/// most replicas the node was seen to hold, its position how many of those
/// have moved away.
#[derive(Debug, Default)]
pub struct Drain {
    most: usize,
}

impl Drain {
    /// Takes in the node's latest row; returns `(length, position)`.
    pub fn update(&mut self, n: &NodeStatus) -> (u64, u64) {
        self.most = self.most.max(n.replicas);
        (self.most as u64, (self.most - n.replicas) as u64)
    }
}

/// The node's status in one word, with its liveness when it is leaving and
/// not up (a decommissioning node that is down still has its replicas moved,
/// from the other members).
pub fn node_status(n: &NodeStatus) -> String {
    match (n.status, n.liveness) {
        (NodeCondition::Decommissioning, l) if l != Liveness::Up => format!("decommissioning ({})", wire_name(&l)),
        (status, _) => wire_name(&status),
    }
}

/// The progress bar's message while node `n` is decommissioned.
pub fn decommission_message(n: &NodeStatus) -> String {
    match n.status {
        NodeCondition::Removed => "removed".into(),
        NodeCondition::Decommissioning if n.replicas == 0 => {
            format!("{}, no replicas left, waiting to be marked removed", node_status(n))
        }
        NodeCondition::Decommissioning => {
            format!("{}, {} left{}", node_status(n), replicas(n.replicas), leading(n.leaders))
        }
        // The node that answered may not have applied the decommission yet.
        _ => format!("{} (not decommissioning yet), {}", node_status(n), replicas(n.replicas)),
    }
}

/// What `cleave decommission --no-wait` prints.
pub fn decommission_started(n: &NodeStatus) -> String {
    format!("node {}: {}, {} to move away (watch it with: cleave status)", n.id, node_status(n), replicas(n.replicas))
}

/// What `cleave decommission` prints once the node is removed.
pub fn decommission_done(n: &NodeStatus, took: Duration) -> String {
    format!(
        "node {}: {} after {}",
        n.id,
        node_status(n),
        humantime::format_duration(Duration::from_secs(took.as_secs()))
    )
}

/// `1 replica`, `3 replicas`.
fn replicas(n: usize) -> String {
    format!("{n} replica{}", if n == 1 { "" } else { "s" })
}

/// ` (leads 2)`, or nothing when it leads none.
fn leading(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" (leads {n})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(status: &str, liveness: &str, replicas: usize, leaders: usize) -> NodeStatus {
        let state = if matches!(status, "decommissioning" | "removed") { status } else { "active" };
        serde_json::from_value(serde_json::json!({
            "id": 4, "raft_addr": "h:7104", "api_addr": "h:7004", "status": status, "state": state,
            "liveness": liveness, "last_heartbeat_ms": 5, "replicas": replicas, "leaders": leaders
        }))
        .unwrap()
    }

    #[test]
    fn the_bar_counts_replicas_moved_away_from_the_most_seen() {
        let mut d = Drain::default();
        assert_eq!(d.update(&node("decommissioning", "up", 3, 1)), (3, 0));
        assert_eq!(d.update(&node("decommissioning", "up", 2, 0)), (3, 1));
        assert_eq!(d.update(&node("decommissioning", "up", 4, 0)), (4, 0), "a move onto it finished late");
        assert_eq!(d.update(&node("removed", "up", 0, 0)), (4, 4));
        assert_eq!(Drain::default().update(&node("removed", "down", 0, 0)), (0, 0));
    }

    #[test]
    fn messages_follow_the_status_and_replica_count() {
        assert_eq!(
            decommission_message(&node("decommissioning", "up", 3, 2)),
            "decommissioning, 3 replicas left (leads 2)"
        );
        assert_eq!(
            decommission_message(&node("decommissioning", "down", 1, 0)),
            "decommissioning (down), 1 replica left"
        );
        assert_eq!(
            decommission_message(&node("decommissioning", "up", 0, 0)),
            "decommissioning, no replicas left, waiting to be marked removed"
        );
        assert_eq!(decommission_message(&node("removed", "down", 0, 0)), "removed");
        assert_eq!(decommission_message(&node("up", "up", 3, 1)), "up (not decommissioning yet), 3 replicas");
    }

    #[test]
    fn start_and_end_lines() {
        assert_eq!(
            decommission_started(&node("decommissioning", "up", 3, 0)),
            "node 4: decommissioning, 3 replicas to move away (watch it with: cleave status)"
        );
        assert_eq!(
            decommission_done(&node("removed", "up", 0, 0), Duration::from_millis(125_400)),
            "node 4: removed after 2m 5s"
        );
    }
}
