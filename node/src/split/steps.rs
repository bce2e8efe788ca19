//! Node-to-node calls the split machinery makes: run a step on a shard's
//! leader, ask a leader for its state, create or destroy a replica.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cleave_metadata::{NodeId, ShardId};

use crate::command::{Command, CommandResponse, ShardCommand};
use crate::node::Node;
use crate::raft::{GroupRaft, ReplicaNode, SmState};
use crate::rpc::{ExecError, NodeReply, NodeRequest};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
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
        self.call(&addr, req, CALL_TIMEOUT).await
    }

    /// Runs `local` here if this node leads `shard` (after a read barrier),
    /// else forwards `req` to the leader.
    pub async fn at_leader<F>(
        &self,
        shard: ShardId,
        hops: u8,
        req: impl Fn(u8) -> NodeRequest,
        local: F,
    ) -> Result<NodeReply, ExecError>
    where
        F: FnOnce(&GroupRaft) -> Result<NodeReply, ExecError>,
    {
        let leader = match self.group(shard) {
            Some(g) => match self.barrier(&g, shard).await {
                Ok(()) => return local(&g),
                Err(Some(l)) => Some(l),
                Err(None) => return Err(ExecError::NoLeader { group: shard }),
            },
            None => None,
        };
        self.forward(shard, hops, leader, req).await
    }

    /// Applies a split step through `shard`'s leader; returns the entry's answer.
    pub async fn shard_step(&self, shard: ShardId, cmd: ShardCommand, hops: u8) -> Result<u64, ExecError> {
        let leader = match self.propose_here(shard, Command::Shard(cmd.clone()), CALL_TIMEOUT).await? {
            Ok((_, CommandResponse::Shard(r))) => return r.map_err(ExecError::Internal),
            Ok((_, other)) => return Err(ExecError::Internal(format!("unexpected response {other:?}"))),
            Err(leader) => leader,
        };
        match self.forward(shard, hops, leader, |hops| NodeRequest::ShardStep { shard, cmd: cmd.clone(), hops }).await?
        {
            NodeReply::Index(i) => Ok(i),
            other => Err(ExecError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// A split target's receiving state, its live keys and bytes, read at its leader.
    pub async fn incoming_status(&self, shard: ShardId, hops: u8) -> Result<NodeReply, ExecError> {
        self.at_leader(shard, hops, |hops| NodeRequest::IncomingStatus { shard, hops }, incoming_of).await
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
        self.at_leader(shard, hops, req, |g| {
            let key = if by_load {
                let samples = g.samples.lock().unwrap();
                let mut keys: Vec<&String> =
                    samples.iter().filter(|k| k.as_str() >= start && end.is_none_or(|e| k.as_str() < e)).collect();
                keys.sort();
                keys.get(keys.len() / 2).map(|k| (*k).clone())
            } else {
                let keys = crate::kv::scan_keys(&self.ctx.db, shard, start, end)
                    .map_err(|e| ExecError::Internal(e.to_string()))?;
                keys.get(keys.len() / 2).cloned()
            };
            // The range start itself cannot be a split point.
            Ok(NodeReply::Key(key.filter(|k| k.as_str() > start)))
        })
        .await
    }

    /// Creates this node's replica of a new group and initialises it with
    /// `members` (with none, it waits to be added to an existing group).
    /// Does nothing if the replica exists.
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
        self.created_at.lock().unwrap().insert(group, dir_version);
        if let Some(g) = self.group(group) {
            if g.replica_id == replica_id {
                return Ok(());
            }
            // The metadata leader only places a new replica here when the
            // directory lists none of this group on this node: what is here
            // is a leftover of an earlier membership (say a move away while
            // this node was down). Replace it.
            tracing::info!(group, old = g.replica_id, new = replica_id, "replacing a leftover replica");
            if let Some(g) = self.remove_group(group) {
                g.shutdown().await;
            }
            GroupRaft::destroy(&self.ctx, group).map_err(|e| ExecError::Internal(e.to_string()))?;
        }
        let raft = GroupRaft::create(&self.ctx, group, replica_id, state)
            .await
            .map_err(|e| ExecError::Internal(e.to_string()))?;
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

    /// Stops and deletes this node's replica of `group`, if any.
    pub async fn destroy_group(&self, group: u64) -> Result<(), ExecError> {
        let _guard = self.group_lifecycle.lock().await;
        if let Some(g) = self.remove_group(group) {
            g.shutdown().await;
        }
        GroupRaft::destroy(&self.ctx, group).map_err(|e| ExecError::Internal(e.to_string()))?;
        crate::metrics::forget_group(group);
        tracing::info!(group, "destroyed replica");
        Ok(())
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
