//! Node-to-node calls the split machinery makes: run a step on a shard's
//! leader, ask a target for its receiving state, find a split key, delete
//! a replica on another node.

use cleave_metadata::{NodeId, ShardId};

use crate::command::{Command, CommandResponse, ShardCommand};
use crate::node::Node;
use crate::raft::{GroupRaft, SmState};
use crate::router::{internal_deadline, left};
use crate::rpc::{self, ExecError, TargetStatus};
use crate::split::mirror::MirrorSpec;
use crate::split::split_key;

/// Applies a split step through `shard`'s leader; returns the entry's answer.
pub async fn shard_step(node: &Node, shard: ShardId, cmd: ShardCommand, hops: u8) -> Result<u64, ExecError> {
    shard_step_at(node, shard, cmd, 0, hops).await.map(|(index, _)| index)
}

/// [`shard_step`] with the entry stamped `at` (0: by the leader's clock).
/// Answers the entry's answer and this node's clock once the step
/// applied, which is past the entry's timestamp: a step stamped from it
/// next, on any shard, is later than this one (the split's `Activate`
/// after the source's freeze, see `watch`).
pub async fn shard_step_at(
    node: &Node,
    shard: ShardId,
    cmd: ShardCommand,
    at: crate::clock::Ts,
    hops: u8,
) -> Result<(u64, crate::clock::Ts), ExecError> {
    let router = node.router();
    let deadline = internal_deadline();
    let clock = &node.ctx().clock;
    let leader =
        match router.propose_here(shard, Command::stamped(at, Command::Shard(cmd.clone())), left(deadline)).await? {
            // Applied here: the apply moved this node's clock past the entry.
            Ok((_, CommandResponse::Shard(r))) => return r.map(|i| (i, clock.now())).map_err(ExecError::Step),
            Ok((_, other)) => return Err(ExecError::Internal(format!("unexpected response {other:?}"))),
            Err(leader) => leader,
        };
    let req = |hops| rpc::ShardStep { shard, cmd: cmd.clone(), at, hops };
    let (index, ts) = router.forward(shard, hops, leader, deadline, req).await?;
    clock.observe(ts);
    Ok((index, clock.now()))
}

/// A split target's receiving state, its live keys and bytes, read at its leader.
pub async fn incoming_status(node: &Node, shard: ShardId, hops: u8) -> Result<TargetStatus, ExecError> {
    let req = |hops| rpc::IncomingStatus { shard, hops };
    node.router().at_leader(shard, hops, req, |g| async move { incoming_of(node, &g) }).await
}

/// A split target's receiving state as applied by any of its replicas
/// (this node's if it has one, else the leader's): it may lag, never lead.
pub async fn incoming_status_any(node: &Node, shard: ShardId) -> Result<TargetStatus, ExecError> {
    match node.group(shard) {
        Some(g) => incoming_of(node, &g),
        None => incoming_status(node, shard, 0).await,
    }
}

/// A key near the middle of `[start, end)` of `shard` (by load: of the
/// sampled requests; else by size or count, [`split_key`]), at its leader.
pub async fn median_key(node: &Node, req: rpc::MedianKey) -> Result<Option<String>, ExecError> {
    let rpc::MedianKey { shard, ref start, ref end, by_load, hops } = req;
    let (start, end) = (start.as_str(), end.as_deref());
    node.router()
        .at_leader(
            shard,
            hops,
            |hops| rpc::MedianKey { hops, ..req.clone() },
            |g| async move {
                let key = if by_load {
                    let samples = g.samples.lock().unwrap();
                    let mut keys: Vec<&String> =
                        samples.iter().filter(|k| k.as_str() >= start && end.is_none_or(|e| k.as_str() < e)).collect();
                    keys.sort();
                    keys.get(keys.len() / 2).map(|k| (*k).clone())
                } else {
                    // Reads file metadata, or scans a small range once:
                    // blocking work, kept off the async workers.
                    let (db, start, end) = (node.ctx().db.clone(), start.to_string(), end.map(str::to_string));
                    tokio::task::spawn_blocking(move || {
                        split_key::split_key(&db, shard, &start, end.as_deref(), split_key::BY_FILES_MIN_BYTES)
                    })
                    .await
                    .map_err(|e| ExecError::Internal(e.to_string()))?
                    .map_err(|e| ExecError::Internal(e.to_string()))?
                };
                // The range start itself cannot be a split point.
                Ok(key.filter(|k| k.as_str() > start))
            },
        )
        .await
}

/// Asks node `target` to delete its replica `replica_id` of `group`. A
/// node that cannot be reached is left alone: it deletes the replica
/// itself once it sees the directory no longer lists it (`moves::gc`),
/// so a cleanup never waits for a dead node.
pub async fn destroy_replica_at(node: &Node, target: NodeId, group: u64, replica_id: u64) -> Result<(), ExecError> {
    match node.router().node_call(target, rpc::DestroyGroup { group, replica_id }).await {
        Err(ExecError::Unavailable(m) | ExecError::Timeout(m)) => {
            tracing::info!(group, node = target, "replica left for the node to collect: {m}");
            Ok(())
        }
        r => r.map(|_| ()),
    }
}

/// The receiving state of a replica as applied here, with the live keys
/// and bytes it received — so far while receiving, at its activation once
/// active — all read under one lock, so they go with the watermark.
fn incoming_of(node: &Node, g: &GroupRaft) -> Result<TargetStatus, ExecError> {
    let mirror = match &*g.state.read().unwrap() {
        SmState::Shard(s) if s.incoming.as_ref().is_some_and(|i| i.mirror_of.is_some()) => s.incoming.clone(),
        _ => None,
    };
    if let Some(inc) = mirror {
        return mirrored(node, g.group, inc);
    }
    match &*g.state.read().unwrap() {
        SmState::Shard(s) => {
            let (keys, bytes) = match (&s.incoming, &s.received) {
                (Some(inc), _) => inc.live,
                (None, Some(r)) => (r.keys, r.bytes),
                // Activated before targets kept their figures: its counts.
                (None, None) => g.stats.get(),
            };
            Ok(TargetStatus { incoming: s.incoming.clone(), active: !s.ranges.is_empty(), keys, bytes })
        }
        SmState::Meta(_) => Err(ExecError::Internal("not a shard".into())),
    }
}

/// A mirrored target's receiving state on this node: what its copy beside
/// the source holds (`split::mirror`). Its watermark is the source's freeze
/// index once the copy is done and the source here applied the freeze
/// (everything up to it is then in the copy), else 0.
fn mirrored(node: &Node, group: u64, mut inc: crate::kv::Incoming) -> Result<TargetStatus, ExecError> {
    let spec = MirrorSpec::of_incoming(group, &inc).expect("checked by the caller");
    let ctx = node.ctx();
    let report =
        ctx.mirrors.report(&ctx.db, &ctx.snapshot_root, &spec).map_err(|e| ExecError::Internal(e.to_string()))?;
    if let Some(r) = report {
        inc.watermark = if r.done { r.frozen_at.unwrap_or(0) } else { 0 };
        inc.digest = r.figures.digest;
        inc.live = (r.figures.keys, r.figures.bytes);
    }
    let (keys, bytes) = inc.live;
    Ok(TargetStatus { incoming: Some(inc), active: false, keys, bytes })
}
