//! The quiescer: puts this node's idle leaders to sleep (`raft::quiesce`).
//!
//! Every [`EVERY`] it looks at the awake replicas only — a quiet one costs
//! a relaxed load — and, for each leader that may go quiet
//! (`GroupRaft::propose_quiescence`), asks its followers on live nodes to
//! go quiet and, with every one agreeing, puts the leader to sleep. Every
//! [`SWEEP_EVERY`] it also wakes any quiet replica that leads without
//! having quiesced as leader (a leader restored at start-up opens quiet),
//! and any quiet voter that has known no leader for two leases (it voted
//! for a candidate that never won): its timer then elects one.
//!
//! Beside it runs the hibernator: every [`HIBERNATE_EVERY`] it drops the
//! openraft instance of replicas quiet and idle for `--dormant-after-ms`
//! (`raft::instance`), one after the other, so a wave of groups going
//! dormant never holds up the quiescer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Node;
use crate::raft::network::{RaftReply, RaftRpc};
use crate::raft::quiesce::Proposal;
use crate::raft::GroupRaft;
use crate::rpc::{Request, Response};

/// How often awake leaders are looked at.
pub const EVERY: Duration = Duration::from_millis(250);
/// How often quiet replicas are checked for unannounced leadership and for
/// a missing leader (a relaxed load for most, a metrics read for some).
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// How often the hibernator looks for replicas to make dormant.
const HIBERNATE_EVERY: Duration = Duration::from_secs(1);
/// How long a follower may take to answer a request to go quiet.
const ASK_TIMEOUT: Duration = Duration::from_millis(500);

/// Runs the quiescer forever.
pub async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lease_ms = node.ctx().settings.election_timeout_ms * 2;
    // The first sweep at once: a leader restored at start-up opened quiet
    // and must heartbeat before its busy groups' followers time out.
    let mut last_sweep = Instant::now() - SWEEP_EVERY;
    tokio::spawn(hibernate(node.clone()));
    loop {
        tick.tick().await;
        let awake = node.groups().awake();
        metrics::gauge!("cleave_raft_groups_awake").set(awake.len() as f64);
        for g in awake {
            if let Some(p) = g.propose_quiescence(|n| node.liveness().is_live(n)) {
                let node = node.clone();
                tokio::spawn(async move {
                    let agreed = ask_followers(&node, &g, &p).await;
                    g.complete_quiescence(&p, agreed);
                });
            }
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            for g in node.groups().in_service() {
                if g.wake_if_leading() {
                    tracing::debug!(group = g.group, "woke a quiet replica that leads");
                } else if g.wake_if_leaderless(lease_ms) {
                    tracing::info!(group = g.group, "woke a quiet voter that knows no leader");
                }
            }
        }
    }
}

/// Runs the hibernator forever (see the module).
async fn hibernate(node: Arc<Node>) {
    if node.ctx().settings.dormant_after_ms == 0 {
        return;
    }
    let mut tick = tokio::time::interval(HIBERNATE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let groups = node.groups().in_service();
        let mut dormant = 0;
        for g in groups {
            if g.hibernate().await {
                tracing::debug!(group = g.group, "dropped the instance of an idle replica");
            }
            dormant += usize::from(g.is_dormant());
        }
        metrics::gauge!("cleave_raft_groups_dormant").set(dormant as f64);
    }
}

/// Asks every follower in `p` to go quiet; answers whether all agreed.
async fn ask_followers(node: &Node, g: &GroupRaft, p: &Proposal) -> bool {
    let asks = p.ask.iter().map(|&(_, peer)| async move {
        let Some(addr) = node.dir_cache().raft_addr_of(&node.directory(), peer) else { return false };
        let req = Request::Raft { group: g.group, msg: RaftRpc::Quiesce(p.request.clone()) };
        matches!(
            node.ctx().transport.call(&addr, req, ASK_TIMEOUT).await,
            Ok(Response::Raft(Ok(RaftReply::Quiesced(true))))
        )
    });
    futures::future::join_all(asks).await.into_iter().all(|ok| ok)
}
