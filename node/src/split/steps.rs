//! Node-to-node calls the split machinery makes: run a step on a shard's
//! leader, ask a leader for its state, create or destroy a replica.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cleave_metadata::{NodeId, ShardId};

use crate::command::{Command, CommandResponse, ShardCommand};
use crate::node::Node;
use crate::raft::{GroupRaft, ReplicaNode, SmState};
use crate::rpc::{ExecError, NodeReply, NodeRequest};

/// How long a new replica waits for its group's leader before initialising
/// the group itself.
pub const FALLBACK_INIT: Duration = Duration::from_secs(3);

impl Node {
    /// Sends `req` to node `id` (handled in place when it is this node).
    pub async fn node_call(&self, id: NodeId, req: NodeRequest) -> Result<NodeReply, ExecError> {
        if id == self.id {
            return Box::pin(self.handle_node_request(req)).await;
        }
        let addr = self.raft_addr_of(id).ok_or(ExecError::Unavailable(format!("node {id} has no known address")))?;
        self.call(&addr, req, crate::router::INTERNAL_TIMEOUT).await
    }

    /// Runs `local` here if this node leads `shard` (after a read barrier),
    /// else forwards `req` to the leader.
    pub async fn at_leader<F, Fut>(
        &self,
        shard: ShardId,
        hops: u8,
        req: impl Fn(u8) -> NodeRequest,
        local: F,
    ) -> Result<NodeReply, ExecError>
    where
        F: FnOnce(Arc<GroupRaft>) -> Fut,
        Fut: std::future::Future<Output = Result<NodeReply, ExecError>>,
    {
        let deadline = crate::router::internal_deadline();
        let leader = match self.group(shard) {
            Some(g) => match self.barrier(&g, shard, deadline).await {
                Ok(()) => return local(g).await,
                Err(Some(l)) => Some(l),
                Err(None) => return Err(ExecError::NoLeader { group: shard }),
            },
            None => None,
        };
        self.forward(shard, hops, leader, deadline, req).await
    }

    /// Applies a split step through `shard`'s leader; returns the entry's answer.
    pub async fn shard_step(&self, shard: ShardId, cmd: ShardCommand, hops: u8) -> Result<u64, ExecError> {
        let deadline = crate::router::internal_deadline();
        let leader = match self.propose_here(shard, Command::Shard(cmd.clone()), crate::router::left(deadline)).await? {
            Ok((_, CommandResponse::Shard(r))) => return r.map_err(ExecError::Step),
            Ok((_, other)) => return Err(ExecError::Internal(format!("unexpected response {other:?}"))),
            Err(leader) => leader,
        };
        let req = |hops| NodeRequest::ShardStep { shard, cmd: cmd.clone(), hops };
        match self.forward(shard, hops, leader, deadline, req).await? {
            NodeReply::Index(i) => Ok(i),
            other => Err(ExecError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// A split target's receiving state, its live keys and bytes, read at its leader.
    pub async fn incoming_status(&self, shard: ShardId, hops: u8) -> Result<NodeReply, ExecError> {
        self.at_leader(
            shard,
            hops,
            |hops| NodeRequest::IncomingStatus { shard, hops },
            |g| async move { incoming_of(&g) },
        )
        .await
    }

    /// A split target's receiving state as applied by any of its replicas
    /// (this node's if it has one, else the leader's): it may lag, never lead.
    pub async fn incoming_status_any(&self, shard: ShardId) -> Result<NodeReply, ExecError> {
        match self.group(shard) {
            Some(g) => incoming_of(&g),
            None => self.incoming_status(shard, 0).await,
        }
    }

    /// A key near the middle of `[start, end)` of `shard`, at its leader.
    pub async fn median_key(
        &self,
        shard: ShardId,
        start: &str,
        end: Option<&str>,
        by_load: bool,
        hops: u8,
        req: impl Fn(u8) -> NodeRequest,
    ) -> Result<NodeReply, ExecError> {
        self.at_leader(shard, hops, req, |g| async move {
            let key = if by_load {
                let samples = g.samples.lock().unwrap();
                let mut keys: Vec<&String> =
                    samples.iter().filter(|k| k.as_str() >= start && end.is_none_or(|e| k.as_str() < e)).collect();
                keys.sort();
                keys.get(keys.len() / 2).map(|k| (*k).clone())
            } else {
                // Streams the range twice (count, then walk to the middle):
                // blocking work, kept off the async workers.
                let (db, start, end) = (self.ctx.db.clone(), start.to_string(), end.map(str::to_string));
                tokio::task::spawn_blocking(move || crate::kv::median_key(&db, shard, &start, end.as_deref()))
                    .await
                    .map_err(|e| ExecError::Internal(e.to_string()))?
                    .map_err(|e| ExecError::Internal(e.to_string()))?
            };
            // The range start itself cannot be a split point.
            Ok(NodeReply::Key(key.filter(|k| k.as_str() > start)))
        })
        .await
    }

    /// Creates this node's replica `replica_id` of a group and initialises it
    /// with `members` (with none, it waits to be added to an existing group).
    /// Does nothing if that replica exists. Replica ids are never reused and
    /// grow, so a request for a replica older than the one held here, or
    /// than one already deleted here (the tombstone), is stale — delayed, or
    /// from a metadata leader that lost its post — and refused.
    pub async fn create_group(
        &self,
        group: u64,
        replica_id: u64,
        members: Vec<(u64, NodeId, String)>,
        state: SmState,
        campaign: bool,
        dir_version: u64,
    ) -> Result<(), ExecError> {
        let _guard = self.group_lifecycle.lock().await;
        let internal = |e: anyhow::Error| ExecError::Internal(format!("{e:#}"));
        let held = self.held_replica(group);
        let tombstone = GroupRaft::tombstone(&self.ctx, group).map_err(internal)?;
        match create_decision(held.as_ref().map(|g| g.replica_id), tombstone, replica_id) {
            CreateDecision::Exists => return Ok(()),
            CreateDecision::Stale(newer) => {
                return Err(ExecError::Refused(format!(
                    "replica {replica_id} of group {group} is stale: replica {newer} is held or was deleted here"
                )))
            }
            CreateDecision::Create => {}
            CreateDecision::Replace(old) => {
                // The metadata leader only places a new replica here when the
                // directory lists none of this group on this node: what is
                // here is a leftover of an earlier membership (say a move
                // away while this node was down). Replace it.
                tracing::info!(group, old, new = replica_id, "replacing a leftover replica");
                self.stop_and_destroy(group, old).await?;
            }
        }
        // The sender's directory lists this replica: from now on replica GC
        // trusts no older directory (persisted, so a restart keeps it too).
        self.raise_directory_floor(dir_version).map_err(internal)?;
        let raft = GroupRaft::create(&self.ctx, group, replica_id, state).await.map_err(internal)?;
        let members: BTreeMap<u64, ReplicaNode> =
            members.into_iter().map(|(r, node_id, raft_addr)| (r, ReplicaNode { node_id, raft_addr })).collect();
        if members.is_empty() {
            // Joins an existing group as a learner: never initialises.
        } else if campaign {
            raft.initialize(members).await.map_err(|e| ExecError::Internal(e.to_string()))?;
        } else {
            raft.initialize_later(members, FALLBACK_INIT);
        }
        self.insert_group(raft);
        tracing::info!(group, replica_id, "created replica");
        Ok(())
    }

    /// Stops and deletes this node's replica `replica_id` of `group`. A
    /// different replica held here is left alone (the request is stale, or
    /// meant one already replaced): the one it names is gone either way, and
    /// is remembered as deleted so that a delayed create cannot bring it back.
    pub async fn destroy_group(&self, group: u64, replica_id: u64) -> Result<(), ExecError> {
        let _guard = self.group_lifecycle.lock().await;
        match self.held_replica(group) {
            Some(g) if g.replica_id != replica_id => {
                tracing::info!(group, held = g.replica_id, replica_id, "not destroying: another replica is held here");
                if replica_id
                    > GroupRaft::tombstone(&self.ctx, group).map_err(|e| ExecError::Internal(e.to_string()))?
                {
                    self.record_tombstone(group, replica_id).await?;
                }
                Ok(())
            }
            _ => self.stop_and_destroy(group, replica_id).await,
        }
    }

    /// Records `replica_id` as deleted without touching the group's data.
    async fn record_tombstone(&self, group: u64, replica_id: u64) -> Result<(), ExecError> {
        let cf = crate::storage::cf(&self.ctx.db, crate::storage::CF_GROUP_META);
        let key = crate::storage::state_key(group, crate::storage::tag::TOMBSTONE);
        let internal = |e: &dyn std::fmt::Display| ExecError::Internal(e.to_string());
        self.ctx.db.put_cf(cf, key, replica_id.to_be_bytes()).map_err(|e| internal(&e))?;
        // Durable before the answer, as destroy's batch is.
        self.ctx.syncer.sync().await.map_err(|e| internal(&e))
    }

    /// Removes the local replica of `group` (if any) from the node, stops it
    /// so no task of it writes again, and deletes its data. Call with the
    /// lifecycle lock held.
    pub(crate) async fn stop_and_destroy(&self, group: u64, replica_id: u64) -> Result<(), ExecError> {
        if let Some(g) = self.remove_group(group) {
            g.shutdown().await;
        }
        GroupRaft::destroy(&self.ctx, group, replica_id).map_err(|e| ExecError::Internal(format!("{e:#}")))?;
        crate::metrics::forget_group(group);
        tracing::info!(group, replica_id, "destroyed replica");
        Ok(())
    }

    /// Asks node `target` to delete its replica `replica_id` of `group`. A
    /// node that cannot be reached is left alone: it deletes the replica
    /// itself once it sees the directory no longer lists it (`moves::gc`),
    /// so a cleanup never waits for a dead node.
    pub async fn destroy_replica_at(&self, target: NodeId, group: u64, replica_id: u64) -> Result<(), ExecError> {
        match self.node_call(target, NodeRequest::DestroyGroup { group, replica_id }).await {
            Err(ExecError::Unavailable(m) | ExecError::Timeout(m)) => {
                tracing::info!(group, node = target, "replica left for the node to collect: {m}");
                Ok(())
            }
            r => r.map(|_| ()),
        }
    }

    /// Remembers a requested key of `shard` for load-based split points.
    pub fn sample_key(&self, g: &GroupRaft, key: &str) {
        // Sample one request in eight to keep the cost off the hot path.
        if g.served.load(Ordering::Relaxed).is_multiple_of(8) {
            let mut s = g.samples.lock().unwrap();
            if s.len() >= 1024 {
                s.pop_front();
            }
            s.push_back(key.to_string());
        }
    }
}

/// What a request to create replica `requested` of a group does, given the
/// replica `held` here (if any) and the group's tombstone.
#[derive(Debug, PartialEq, Eq)]
enum CreateDecision {
    /// That very replica is here: nothing to do (the request is a retry).
    Exists,
    Create,
    /// An older replica is here: delete it, then create.
    Replace(u64),
    /// The request is older than a replica held or deleted here: refuse it.
    Stale(u64),
}

fn create_decision(held: Option<u64>, tombstone: u64, requested: u64) -> CreateDecision {
    match held {
        Some(h) if h == requested => CreateDecision::Exists,
        Some(h) if h > requested => CreateDecision::Stale(h),
        _ if requested <= tombstone => CreateDecision::Stale(tombstone),
        Some(h) => CreateDecision::Replace(h),
        None => CreateDecision::Create,
    }
}

/// The receiving state of a replica as applied here.
fn incoming_of(g: &GroupRaft) -> Result<NodeReply, ExecError> {
    let (keys, bytes) = g.stats.get();
    match &*g.state.read().unwrap() {
        SmState::Shard(s) => {
            Ok(NodeReply::Incoming { incoming: s.incoming.clone(), active: !s.ranges.is_empty(), keys, bytes })
        }
        SmState::Meta(_) => Err(ExecError::Internal("not a shard".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_create_request_older_than_what_the_node_holds_or_deleted_is_refused() {
        use CreateDecision::*;
        assert_eq!(create_decision(None, 0, 5), Create);
        assert_eq!(create_decision(Some(5), 0, 5), Exists, "a retry");
        assert_eq!(create_decision(Some(3), 0, 5), Replace(3), "a leftover of an older membership");
        // A delayed request for replica 3 after replica 5 came here: it must
        // not destroy the newer replica.
        assert_eq!(create_decision(Some(5), 0, 3), Stale(5));
        // Replica 5 was deleted here: a delayed create must not bring it back.
        assert_eq!(create_decision(None, 5, 5), Stale(5));
        assert_eq!(create_decision(None, 5, 4), Stale(5));
        assert_eq!(create_decision(None, 5, 6), Create);
        assert_eq!(create_decision(Some(6), 5, 6), Exists);
    }
}
