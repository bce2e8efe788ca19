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
use std::time::Duration;

use super::changes;
use crate::clock;
use crate::command::ShardCommand;
use crate::node::Node;
use crate::raft::SmState;
use crate::txn::resolve::now_ms;

/// How often the shards are looked at.
const EVERY: Duration = Duration::from_secs(5);
/// A write lock held this long is settled by the leader: past the lock
/// TTL (`txn::coordinator`, 3 s) its transaction is over or expired, and
/// a dead coordinator's lock holds back every watch of the shard.
const STALE_LOCK: Duration = Duration::from_secs(5);

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
    let (bytes, from, resolved, locks) = match &*g.state.read().map_err(|_| anyhow::anyhow!("state lock poisoned"))? {
        SmState::Shard(s) => {
            let locks: Vec<(String, clock::Ts)> = s.open_locks.iter().map(|(k, t)| (k.clone(), *t)).collect();
            (s.change_log.bytes, s.change_log.trimmed_through, s.resolved(), locks)
        }
        SmState::Meta(_) => return Ok(()),
    };
    if !g.status().is_leader {
        return Ok(());
    }
    settle_old_locks(node, &locks).await;
    if bytes == 0 {
        return Ok(());
    }
    let settings = &node.settings().watch;
    let now_ms = now_ms();
    let older_than = clock::from_wall_ms(now_ms.saturating_sub(settings.retention.as_millis() as u64));
    let (db, group, keep) = (node.ctx().db.clone(), g.group, settings.retention_bytes);
    let point = tokio::task::spawn_blocking(move || changes::trim_point(&db, group, bytes, older_than, keep, resolved))
        .await??;
    if let Some((through, dropped)) = point {
        let trim = ShardCommand::TrimChanges { from, through, bytes: dropped };
        crate::split::steps::shard_step(node, g.group, trim, 0).await?;
    }
    Ok(())
}

/// A write lock holds its shard's resolved timestamp, so every watch of
/// the shard, and its change log's trim, until its transaction ends. One
/// whose coordinator died ends when someone meets it: here, the leader
/// meets those older than [`STALE_LOCK`] — reading the key settles the
/// lock at the transaction's primary (committing or rolling back), as any
/// reader's would.
async fn settle_old_locks(node: &Node, locks: &[(String, clock::Ts)]) {
    let now_ms = now_ms();
    for (key, ts) in locks {
        if clock::wall_ms(*ts) + STALE_LOCK.as_millis() as u64 <= now_ms {
            if let Err(e) = node.router().read(key, true).await {
                tracing::debug!("settling an old lock on {key:?}: {e}");
            }
        }
    }
}
