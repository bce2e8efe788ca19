//! Keeping change logs to their retention (`--watch-retention`, time, and
//! `--watch-retention-mb`, size per shard).
//!
//! Every few seconds each node looks at the shards it leads: one whose
//! oldest change is older than the retention, or whose log is larger than
//! allowed, gets a `TrimChanges` entry dropping the oldest timestamps —
//! never past the shard's resolved timestamp, and never part of a
//! timestamp. Trimming goes through the log, so every replica holds the
//! same history and answers the same `compacted` to the same cursor; the
//! leader's byte count of what goes is right on every replica for the same
//! reason. A shard with an empty log costs a look at its state.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::changes;
use crate::clock;
use crate::command::ShardCommand;
use crate::node::Node;
use crate::raft::SmState;

/// How often the shards are looked at.
const EVERY: Duration = Duration::from_secs(5);

/// Runs for the node's life.
pub async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for g in node.groups().in_service() {
            if let Err(e) = trim_one(&node, &g).await {
                tracing::debug!(group = g.group, "trimming the change log: {e}");
            }
        }
    }
}

async fn trim_one(node: &Node, g: &crate::raft::GroupRaft) -> anyhow::Result<()> {
    let (bytes, resolved) = match &*g.state.read().map_err(|_| anyhow::anyhow!("state lock poisoned"))? {
        SmState::Shard(s) => (s.change_log.bytes, s.resolved()),
        SmState::Meta(_) => return Ok(()),
    };
    if bytes == 0 || !g.status().is_leader {
        return Ok(());
    }
    let settings = &node.settings().watch;
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let older_than = clock::from_wall_ms(now_ms.saturating_sub(settings.retention.as_millis() as u64));
    let (db, group, keep) = (node.ctx().db.clone(), g.group, settings.retention_bytes);
    let point = tokio::task::spawn_blocking(move || changes::trim_point(&db, group, bytes, older_than, keep, resolved))
        .await??;
    if let Some((through, dropped)) = point {
        crate::split::steps::shard_step(node, g.group, ShardCommand::TrimChanges { through, bytes: dropped }, 0)
            .await?;
    }
    Ok(())
}
