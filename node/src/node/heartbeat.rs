//! The node's heartbeat: every `--node-heartbeat-ms` it reports to the
//! metadata leader (`MetaLeader::beat`: liveness, per-replica figures) and
//! adopts the directory and leader hints of the answer; with a directory
//! just confirmed by the metadata leader it persists the directory floor
//! and collects the replicas the directory no longer lists (`moves::gc`);
//! and it refreshes the node's gauges.

use std::sync::Arc;

use super::Node;
use crate::moves::gc;

/// Sends this node's heartbeat every `--node-heartbeat-ms`, forever; with
/// the directory just confirmed by the metadata leader, collects replicas it
/// no longer lists.
pub async fn heartbeat_loop(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.settings().heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut collector = gc::Collector::default();
    loop {
        tick.tick().await;
        match node.meta_leader().beat().await {
            Ok(()) => {
                // Persisted before GC acts on it: the floor GC trusts from.
                match node.dir_cache().remember(&node.directory()) {
                    Ok(()) => gc::collect(&node, &mut collector).await,
                    Err(e) => tracing::warn!("persisting cluster.json: {e:#}"),
                }
            }
            Err(e) => tracing::debug!("heartbeat: {e}"),
        }
        crate::metrics::update_gauges(&node.groups().in_service(), &node.ctx().db);
    }
}
