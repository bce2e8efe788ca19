//! The replicas a node holds, and their life cycle: opened at start-up,
//! created when the metadata leader places a replica here (a split's new
//! shard, a move's target), destroyed when a split is abandoned, a move
//! leaves, or replica GC finds a replica the directory no longer lists.
//!
//! Creating and destroying are serialised by one lock, taken before the
//! node is published to the RPC server, so a request can never race with
//! the opening of the very group it names. Replica ids are never reused and
//! grow, and a destroyed replica leaves a tombstone, so a delayed or
//! duplicated request can neither bring a deleted replica back nor delete
//! a newer one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use cleave_metadata::{Directory, NodeId};

use super::directory::DirectoryCache;
use crate::raft::{GroupRaft, RaftContext, ReplicaNode};
use crate::rpc::{self, ExecError};

/// How long a new replica waits for its group's leader before initialising
/// the group itself.
pub const FALLBACK_INIT: std::time::Duration = std::time::Duration::from_secs(3);

/// See the module.
pub struct Groups {
    ctx: RaftContext,
    map: RwLock<HashMap<u64, Arc<GroupRaft>>>,
    /// Serialises creating and destroying local replicas.
    lifecycle: tokio::sync::Mutex<()>,
    /// The failed replicas' groups as last looked up, and when.
    failed: std::sync::Mutex<(Option<std::time::Instant>, Vec<u64>)>,
}

/// How stale the list of failed replicas may be.
const FAILED_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

impl Groups {
    pub(super) fn new(ctx: RaftContext) -> Groups {
        Groups { ctx, map: RwLock::default(), lifecycle: Default::default(), failed: Default::default() }
    }

    /// This node's replica of group `id`, unless a storage error stopped it
    /// (a failed replica is out of service: see `GroupSm::fail`).
    pub fn get(&self, id: u64) -> Option<Arc<GroupRaft>> {
        self.map.read().unwrap().get(&id).filter(|g| !g.is_failed()).cloned()
    }

    /// The replica of group `id` held here, failed or not (for creating and
    /// destroying replicas, which must see every replica on disk).
    pub(super) fn held(&self, id: u64) -> Option<Arc<GroupRaft>> {
        self.map.read().unwrap().get(&id).cloned()
    }

    /// The replicas in service, by group id.
    pub fn in_service(&self) -> Vec<Arc<GroupRaft>> {
        let mut v: Vec<_> = self.map.read().unwrap().values().filter(|g| !g.is_failed()).cloned().collect();
        v.sort_by_key(|g| g.group);
        v
    }

    /// The replicas in service that are awake (not quiet), in no order: the
    /// ones background loops need to look at. A quiet replica costs nothing
    /// here (`ctx.awake` lists only groups that may be awake).
    pub fn awake(&self) -> Vec<Arc<GroupRaft>> {
        let map = self.map.read().unwrap();
        let awake = self.ctx.awake.awake(|id| map.get(&id).map(|g| (g.clone(), !g.is_quiet())));
        awake.into_iter().filter(|g| !g.is_failed()).collect()
    }

    /// Groups whose replica here a storage error stopped (asked by every
    /// peer's liveness ping, ten times a second each: looked up at most
    /// every [`FAILED_EVERY`]).
    pub fn failed(&self) -> Vec<u64> {
        let mut cached = self.failed.lock().unwrap();
        if cached.0.is_none_or(|at| at.elapsed() >= FAILED_EVERY) {
            let failed = self.map.read().unwrap().values().filter(|g| g.is_failed()).map(|g| g.group).collect();
            *cached = (Some(std::time::Instant::now()), failed);
        }
        cached.1.clone()
    }

    /// Whether no replica at all is held here, failed ones included.
    pub(super) fn is_empty(&self) -> bool {
        self.map.read().unwrap().is_empty()
    }

    /// Takes the lifecycle lock (see the module).
    pub(super) async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lifecycle.lock().await
    }

    pub(super) fn insert(&self, g: Arc<GroupRaft>) {
        let (group, awake) = (g.group, !g.is_quiet());
        self.map.write().unwrap().insert(group, g);
        // Listed when it opened, but possibly dropped by a look before it
        // was in the map: list it again (after the insert).
        if awake {
            self.ctx.awake.insert(group);
        }
    }

    /// Opens every replica recorded on disk (call with the lifecycle lock).
    pub(super) async fn open_all(&self) -> anyhow::Result<()> {
        let held = GroupRaft::list(&self.ctx.db)?;
        GroupRaft::remove_orphan_snapshots(&self.ctx, &held)?;
        for desc in held {
            let g = GroupRaft::open(&self.ctx, desc.clone())
                .await
                .with_context(|| format!("opening group {}", desc.group))?;
            self.insert(Arc::new(g));
        }
        Ok(())
    }

    /// Creates this node's replica `replica_id` of a group and initialises it
    /// with `members` (with none, it waits to be added to an existing group).
    /// Does nothing if that replica exists. A request for a replica older
    /// than the one held here, or than one already deleted here (the
    /// tombstone), is stale — delayed, or from a metadata leader that lost
    /// its post — and refused.
    pub(super) async fn create(&self, cache: &DirectoryCache, req: rpc::CreateGroup) -> Result<(), ExecError> {
        let rpc::CreateGroup { group, replica_id, members, state, campaign, dir_version } = req;
        let _guard = self.lifecycle.lock().await;
        let internal = |e: anyhow::Error| ExecError::Internal(format!("{e:#}"));
        let held = self.held(group);
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
        cache.raise_floor(dir_version).map_err(internal)?;
        let raft = Arc::new(GroupRaft::create(&self.ctx, group, replica_id, *state).await.map_err(internal)?);
        let members: BTreeMap<u64, ReplicaNode> =
            members.into_iter().map(|(r, node_id, raft_addr)| (r, ReplicaNode { node_id, raft_addr })).collect();
        if members.is_empty() {
            // Joins an existing group as a learner: never initialises.
        } else if campaign {
            raft.initialize(members).await.map_err(|e| ExecError::Internal(e.to_string()))?;
        } else {
            raft.initialize_later(members, FALLBACK_INIT);
        }
        self.insert(raft);
        tracing::info!(group, replica_id, "created replica");
        Ok(())
    }

    /// Stops and deletes this node's replica `replica_id` of `group`. A
    /// different replica held here is left alone (the request is stale, or
    /// meant one already replaced): the one it names is gone either way, and
    /// is remembered as deleted so that a delayed create cannot bring it back.
    pub(super) async fn destroy(&self, group: u64, replica_id: u64) -> Result<(), ExecError> {
        let _guard = self.lifecycle.lock().await;
        match self.held(group) {
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

    /// Deletes this node's replica `replica_id` of `group` if, checked again
    /// under the lifecycle lock, it is still the replica held here and the
    /// newest directory still does not want it (`moves::gc`). `newest`
    /// gives the node's newest directory and its directory floor; both are
    /// read under the lock, so a `CreateGroup` that landed meanwhile (it
    /// raised the floor) is never destroyed. Returns whether it did.
    pub(super) async fn collect(
        &self,
        newest: impl FnOnce() -> (Arc<Directory>, u64),
        me: NodeId,
        group: u64,
        replica_id: u64,
    ) -> Result<bool, ExecError> {
        let _guard = self.lifecycle.lock().await;
        let held = self.get(group).map(|g| g.replica_id);
        let (dir, floor) = newest();
        if held != Some(replica_id) || !unwanted(&dir, floor, me, group) {
            tracing::info!(group, replica_id, ?held, "replica gc: wanted again, or replaced; kept");
            return Ok(false);
        }
        tracing::info!(group, replica_id, version = dir.version, "deleting a replica the directory no longer lists");
        self.stop_and_destroy(group, replica_id).await?;
        Ok(true)
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
    async fn stop_and_destroy(&self, group: u64, replica_id: u64) -> Result<(), ExecError> {
        let removed = self.map.write().unwrap().remove(&group);
        if let Some(g) = removed {
            g.shutdown().await;
        }
        GroupRaft::destroy(&self.ctx, group, replica_id).map_err(|e| ExecError::Internal(format!("{e:#}")))?;
        crate::metrics::forget_group(group);
        tracing::info!(group, replica_id, "destroyed replica");
        Ok(())
    }

    /// Stops every replica cleanly.
    pub async fn shutdown(&self) {
        for g in self.in_service() {
            g.shutdown().await;
        }
    }
}

/// Whether `dir` says `node` may delete its replica of `group`: the
/// directory is known, not older than `floor` (the newest version this
/// node has seen), and neither lists the replica nor creates one there.
pub fn unwanted(dir: &Directory, floor: u64, node: NodeId, group: u64) -> bool {
    dir.version > 0 && dir.version >= floor && !dir.expects_replica(node, group)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    use crate::kv::ShardState;
    use crate::raft::SmState;

    /// A directory of nodes 1–3 (no replica of group 7 anywhere).
    fn dir() -> Arc<Directory> {
        Arc::new(Directory::bootstrap(&[(1, "a".into()), (2, "b".into()), (3, "c".into())], 3))
    }

    #[tokio::test]
    async fn gc_judges_by_the_directory_and_floor_read_under_the_lifecycle_lock() {
        let (_d, ctx) = crate::testing::temp_ctx();
        let groups = Arc::new(Groups::new(ctx.clone()));
        let g = GroupRaft::create(&ctx, 7, 4, SmState::Shard(ShardState::default())).await.unwrap();
        groups.insert(Arc::new(g));
        let version = dir().version;
        let floor = Arc::new(AtomicU64::new(version));
        // A create request holds the lock and raises the floor (its
        // directory lists the replica) while GC waits for the lock.
        let lock = groups.lock().await;
        let gc = {
            let (groups, floor) = (groups.clone(), floor.clone());
            tokio::spawn(async move { groups.collect(|| (dir(), floor.load(Ordering::SeqCst)), 1, 7, 4).await })
        };
        tokio::task::yield_now().await;
        floor.store(version + 2, Ordering::SeqCst);
        drop(lock);
        assert!(!gc.await.unwrap().unwrap(), "judged with the floor raised meanwhile: kept");
        assert!(groups.get(7).is_some());
        // With nothing newer than the directory at hand, it goes.
        assert!(groups.collect(|| (dir(), version), 1, 7, 4).await.unwrap());
        assert!(groups.get(7).is_none() && groups.is_empty());
        assert!(!groups.collect(|| (dir(), version), 1, 7, 4).await.unwrap(), "gone already");
    }

    #[tokio::test]
    async fn a_destroy_naming_another_replica_leaves_the_held_one_and_blocks_a_late_create() {
        let (_d, ctx) = crate::testing::temp_ctx();
        let groups = Groups::new(ctx.clone());
        let hints = ctx.snapshot_root.with_file_name("cluster.json");
        let cache = DirectoryCache::new(1, "a".into(), vec![], hints, ctx.addresses.clone()).unwrap();
        let create = |replica_id| rpc::CreateGroup {
            group: 9,
            replica_id,
            members: vec![],
            state: Box::new(SmState::Shard(ShardState::default())),
            campaign: false,
            dir_version: 5,
        };
        groups.create(&cache, create(3)).await.unwrap();
        assert_eq!(cache.floor(), 5, "the floor is raised before the replica exists");
        groups.create(&cache, create(3)).await.unwrap();
        assert_eq!(groups.get(9).map(|g| g.replica_id), Some(3), "a retried create is a no-op");
        // A delayed destroy of a later replica id leaves replica 3 alone...
        groups.destroy(9, 4).await.unwrap();
        assert_eq!(groups.get(9).map(|g| g.replica_id), Some(3));
        // ...and a create of that replica, arriving after, is refused.
        groups.destroy(9, 3).await.unwrap();
        assert!(groups.get(9).is_none());
        assert!(matches!(groups.create(&cache, create(4)).await, Err(ExecError::Refused(_))));
        assert!(matches!(groups.create(&cache, create(3)).await, Err(ExecError::Refused(_))));
        groups.create(&cache, create(5)).await.unwrap();
        assert_eq!(groups.get(9).map(|g| g.replica_id), Some(5));
        groups.shutdown().await;
    }

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
