//! openraft's state machine for one group.
//!
//! Applying a batch of entries builds one RocksDB write batch holding the
//! user data changes, the new applied log id, the last membership and (for
//! the metadata group) the directory, and writes it atomically. A crash
//! therefore leaves either all of a batch or none of it, and replaying the
//! log from the stored applied id is exact. The batch is not fsync'd: the
//! entries it applies are already durable in the log.
//!
//! The in-memory [`SmState`] (directory or owned ranges) is shared with the
//! rest of the node through an `Arc<RwLock<_>>` and changed only here.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures::{Stream, TryStreamExt};
use openraft::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};

use super::incarnation::Incarnation;
use super::snapshot::{self, SnapshotFile};
use super::{SmState, TypeConfig};
use crate::command::{Command, CommandResponse, ShardCommand};
use crate::kv;
use crate::storage::{self, io_err, state_key, tag, Db, CF_GROUP_META};

use crate::codec::encode;

/// State machine of one group.
pub struct GroupSm {
    pub(super) db: Arc<Db>,
    pub(super) group: u64,
    pub(super) state: Arc<RwLock<SmState>>,
    pub(super) snapshot_root: PathBuf,
    /// Live keys and bytes (shards), kept in step with applied entries.
    pub(super) stats: Arc<super::GroupStats>,
    /// Every storage write goes through it (see [`super::incarnation`]).
    pub(super) incarnation: Arc<Incarnation>,
    /// Set while a snapshot install replaces the data (under the state lock).
    pub(super) installing: Arc<AtomicBool>,
    /// Set when a storage error stopped this replica (see [`GroupSm::fail`]).
    pub(super) failed: Arc<AtomicBool>,
    /// The node's split mirrors (`split::mirror`).
    pub(super) mirrors: Arc<crate::split::mirror::Mirrors>,
    /// The node's clock: moved past every timestamp a shard's apply gives.
    pub(super) clock: Arc<crate::clock::Clock>,
    /// The shard's resolved timestamp, sent after every batch (`watch`).
    pub(super) resolved: Arc<tokio::sync::watch::Sender<crate::clock::Ts>>,
}

impl GroupSm {
    /// A storage error stopped this replica: openraft stops it (the error is
    /// fatal), and the node takes it out of service — no request, Raft
    /// message or report reaches it any more, so it neither answers from a
    /// state that the disk does not hold nor hides the group's real leader.
    /// Its data stays on disk for the operator; the group heals elsewhere.
    fn fail(&self, what: &str, e: &dyn std::fmt::Display) {
        tracing::error!(group = self.group, "storage error in {what}, this replica stops: {e}");
        metrics::counter!("cleave_replicas_failed_total").increment(1);
        self.failed.store(true, Ordering::SeqCst);
    }

    fn meta_get<T: serde::de::DeserializeOwned>(&self, t: u8) -> io::Result<Option<T>> {
        storage::get_decoded(&self.db, CF_GROUP_META, &state_key(self.group, t))
    }

    /// Applies one command. An error is a storage failure: it stops the
    /// replica instead of becoming an answer the other replicas would not give.
    fn apply_command(
        &self,
        state: &mut SmState,
        b: &mut kv::ApplyBatch,
        index: u64,
        cmd: &Command,
    ) -> io::Result<CommandResponse> {
        Ok(match (cmd, state) {
            (Command::Kv(c), SmState::Shard(s)) => {
                CommandResponse::Kv(kv::apply(&self.db, self.group, index, s, b, c).map_err(io_err)?)
            }
            (Command::Txn(c), SmState::Shard(s)) => {
                CommandResponse::Txn(crate::txn::apply::apply(&self.db, self.group, index, s, b, c).map_err(io_err)?)
            }
            (Command::Shard(c), SmState::Shard(s)) => CommandResponse::Shard(
                crate::split::apply::apply(&self.db, self.group, index, s, b, c).map_err(io_err)?,
            ),
            (Command::Meta(c), SmState::Meta(d)) => CommandResponse::Meta(match d.apply_keeping_previous(c) {
                Ok((resp, before)) => {
                    // The records that changed; the header is written with the batch.
                    super::directory_store::write_changes(&self.db, &mut b.write, self.group, &before, d)?;
                    b.changed = true;
                    Ok(resp)
                }
                Err(e) => Err(e),
            }),
            (cmd, _) => CommandResponse::Rejected(format!("group {} cannot apply {cmd:?}", self.group)),
        })
    }
}

impl GroupSm {
    /// Writes one apply batch: the entries' changes with the applied log
    /// id, the membership, the state and the stats they leave, atomically.
    /// Called inside the incarnation (see `apply`).
    fn write_batch(
        &self,
        state: &SmState,
        mut b: kv::ApplyBatch,
        last_applied: Option<&LogIdOf<TypeConfig>>,
        membership: Option<StoredMembershipOf<TypeConfig>>,
    ) -> io::Result<()> {
        let meta_cf = storage::cf(&self.db, CF_GROUP_META);
        if let Some(l) = last_applied {
            b.write.put_cf(meta_cf, state_key(self.group, tag::APPLIED), encode(l)?);
        }
        if let Some(m) = &membership {
            b.write.put_cf(meta_cf, state_key(self.group, tag::MEMBERSHIP), encode(m)?);
        }
        if b.changed {
            b.write.put_cf(meta_cf, state_key(self.group, tag::SM_STATE), state.stored_json()?);
        }
        let (keys, bytes) = self.stats.get();
        let keys = (keys as i64 + b.stats.keys).max(0) as u64;
        let bytes = (bytes as i64 + b.stats.bytes).max(0) as u64;
        if b.stats != kv::StatsDelta::default() {
            b.write.put_cf(meta_cf, state_key(self.group, tag::KEYS), super::GroupStats::encode(keys, bytes));
        }
        let mirrored = std::mem::take(&mut b.mirrored);
        let write = |w: rocksdb::WriteBatch| self.db.write(w).map_err(io_err);
        if mirrored.is_empty() { write(b.write) } else { self.mirrors.write_with(&self.db, b.write, mirrored, write) }
            .inspect_err(|e| self.fail("writing an apply batch", e))?;
        self.stats.set(keys, bytes);
        Ok(())
    }

    /// Before `cmd` is applied: if it is a split's backfill files this
    /// replica waits for (`split::sst`), write what the batch holds so far
    /// (the entries before it, applied index and all), then ingest the
    /// files. Ingested data lies over everything written before it, so
    /// nothing that precedes the entry may still be pending; the entry's
    /// own changes and those after it follow in the next batch. A crash
    /// in between replays the entry, and the files' marker stops a second
    /// ingest. Files missing or unlike the entry stop the replica.
    fn ingest_before(
        &self,
        state: &SmState,
        b: &mut kv::ApplyBatch,
        last_applied: Option<&LogIdOf<TypeConfig>>,
        membership: &mut Option<StoredMembershipOf<TypeConfig>>,
        cmd: &Command,
    ) -> io::Result<()> {
        let (Command::Shard(step), SmState::Shard(s)) = (cmd, state) else { return Ok(()) };
        let ends_receiving = match step {
            ShardCommand::Activate { .. } => true,
            // Only the merge being received (a late duplicate of an older
            // one must not take a newer one's files).
            ShardCommand::Absorb { op_id, .. } | ShardCommand::DropAbsorbed { op_id } => {
                s.incoming.as_ref().is_some_and(|i| i.op_id == *op_id)
            }
            _ => false,
        };
        if ends_receiving {
            // Files a late chunk staged after the ingest, or the attempts
            // of a merge given up: nothing needs them.
            crate::split::receive::remove_staged(&self.snapshot_root, self.group);
        }
        let Some((op, attempt, files)) = crate::split::apply::backfill_files_to_ingest(s, step) else {
            return Ok(());
        };
        self.write_batch(state, std::mem::take(b), last_applied, membership.take())?;
        crate::split::sst::ingest_staged(&self.db, &self.snapshot_root, self.group, op, attempt, files)
            .inspect_err(|e| self.fail("ingesting a split's backfill files", e))
    }
}

impl GroupSm {
    /// Before a batch is applied: a split step that needs a mirrored range
    /// complete on this node (`split::mirror`) waits for it — the source's
    /// `SplitDone`, which drops the range, until the copy beside it is done;
    /// the target's `Activate` until, besides, the source here applied the
    /// freeze, and its figures then go with the batch. A target that should
    /// be mirrored here and cannot be (the source replica here no longer
    /// has the range) stops: it would serve a range it does not hold.
    async fn mirror_before(&self, cmds: &[&ShardCommand], b: &mut kv::ApplyBatch) -> io::Result<Vec<u64>> {
        self.mirror_wait(cmds, b).await.inspect_err(|e| self.fail("waiting for a split's mirrored range", e))
    }

    async fn mirror_wait(&self, cmds: &[&ShardCommand], b: &mut kv::ApplyBatch) -> io::Result<Vec<u64>> {
        use crate::split::mirror::{self, MirrorSpec};
        let mut activated = Vec::new();
        for cmd in cmds {
            let (spec, activate) = {
                let state = self.state.read().map_err(|_| io::Error::other("state lock poisoned"))?;
                let SmState::Shard(s) = &*state else { return Ok(activated) };
                match cmd {
                    ShardCommand::SplitDone { op_id, .. } => {
                        let Some(c) = s.captures.iter().find(|c| c.op_id == *op_id && c.mirror) else { continue };
                        (MirrorSpec::of_capture(self.group, c), false)
                    }
                    ShardCommand::Activate { op_id, .. } => {
                        let inc = s.incoming.as_ref().filter(|i| i.op_id == *op_id);
                        let Some(spec) = inc.and_then(|i| MirrorSpec::of_incoming(self.group, i)) else { continue };
                        (spec, true)
                    }
                    _ => continue,
                }
            };
            loop {
                let m = self.mirrors.wait_done(&self.db, &self.snapshot_root, &spec).await?;
                let Some(m) = m else {
                    if activate {
                        let e = format!("operation {}: the range cannot be filled beside its source here", spec.op);
                        return Err(io::Error::other(e));
                    }
                    break;
                };
                if !activate {
                    break;
                }
                mirror::wait_source_frozen(&self.db, &spec).await?;
                // Taken for the activation, so that no reset (a snapshot
                // into the source) touches the keys from now on; a reset
                // that came first means copying again.
                if self.mirrors.claim(&m) {
                    b.mirror_figures.insert(spec.op, m.figures());
                    activated.push(spec.target);
                    break;
                }
            }
        }
        Ok(activated)
    }
}

/// Builds snapshots in the background from a consistent RocksDB snapshot.
pub struct SnapshotBuilder {
    db: Arc<Db>,
    group: u64,
    root: PathBuf,
    incarnation: Arc<Incarnation>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotFile>, io::Error> {
        let (db, group, root, inc) = (self.db.clone(), self.group, self.root.clone(), self.incarnation.clone());
        let (meta, file) =
            tokio::task::spawn_blocking(move || snapshot::build(&db, group, &root, &inc)).await.map_err(io_err)??;
        Ok(SnapshotOf::<TypeConfig, SnapshotFile> { meta, snapshot: file })
    }
}

impl RaftStateMachine<TypeConfig> for GroupSm {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error> {
        Ok((self.meta_get(tag::APPLIED)?, self.meta_get(tag::MEMBERSHIP)?.unwrap_or_default()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut b = kv::ApplyBatch::default();
        let mut responses = Vec::new();
        let mut last_applied = None;
        let mut membership = None;
        // Entries arrive as a stream; collect what is ready, then apply under
        // one lock and write one batch.
        let mut items = Vec::new();
        while let Some(item) = entries.try_next().await? {
            items.push(item);
        }
        let steps: Vec<&ShardCommand> = items
            .iter()
            .filter_map(|(e, _)| match &e.payload {
                EntryPayload::Normal(cmd) => match cmd.unstamped().0 {
                    Command::Shard(c @ (ShardCommand::SplitDone { .. } | ShardCommand::Activate { .. })) => Some(c),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        let activated = if steps.is_empty() { Vec::new() } else { self.mirror_before(&steps, &mut b).await? };
        // The whole apply runs inside the incarnation: an instance that has
        // ended (a dormant replica's old state-machine worker, still running
        // a batch queued before its shutdown) changes neither the storage
        // nor the state and stats it shares with the instance that
        // replaced it. Nothing below may take the incarnation again.
        self.incarnation.write(|| {
            let mut state = self.state.write().map_err(|_| io::Error::other("state lock poisoned"))?;
            for (entry, responder) in items {
                let log_id = entry.log_id;
                let resp = match &entry.payload {
                    EntryPayload::Blank => CommandResponse::None,
                    EntryPayload::Normal(cmd) => {
                        let (cmd, stamp) = cmd.unstamped();
                        // Before the entry takes its timestamp: an ingest
                        // writes the batch so far, which a crash may leave
                        // as the last written before the entry is replayed.
                        self.ingest_before(&state, &mut b, last_applied.as_ref(), &mut membership, cmd)?;
                        if let SmState::Shard(s) = &mut *state {
                            b.ts = s.next_ts(stamp);
                            b.stamp = stamp;
                            b.origin = crate::watch::cursor::entry_origin(self.group);
                            b.changed = true;
                        }
                        self.apply_command(&mut state, &mut b, log_id.index, cmd).inspect_err(|e| {
                            self.fail(&format!("applying entry {}", log_id.index), e);
                        })?
                    }
                    EntryPayload::Membership(m) => {
                        membership = Some(StoredMembershipOf::<TypeConfig>::new(Some(log_id), m.clone()));
                        CommandResponse::None
                    }
                };
                last_applied = Some(log_id);
                if let Some(r) = responder {
                    responses.push((r, resp));
                }
            }
            self.write_batch(&state, std::mem::take(&mut b), last_applied.as_ref(), membership.take())?;
            if let SmState::Shard(s) = &*state {
                self.clock.observe(s.last_ts);
                let resolved = s.resolved();
                self.resolved.send_if_modified(|r| std::mem::replace(r, resolved) != resolved);
            }
            Ok(())
        })?;
        for target in activated {
            self.mirrors.activated(target);
        }
        for (responder, resp) in responses {
            responder.send(resp);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            group: self.group,
            root: self.snapshot_root.clone(),
            incarnation: self.incarnation.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        file: SnapshotFile,
    ) -> Result<(), io::Error> {
        tracing::info!(group = self.group, last = ?meta.last_log_id, "installing snapshot");
        let (db, group, inc) = (self.db.clone(), self.group, self.incarnation.clone());
        let root = self.snapshot_root.clone();
        // Readers of this replica's data (stale reads) look at this flag under
        // the state lock: from here until the new state is in place the data
        // is half old, half new. The flag and the state are shared with any
        // later instance of this replica (a dormant one reopened): an
        // instance that has ended touches neither (the incarnation).
        self.incarnation.write(|| {
            let _state = self.state.write().map_err(|_| io::Error::other("state lock poisoned"))?;
            self.installing.store(true, Ordering::SeqCst);
            Ok(())
        })?;
        // Split targets filled from this replica's data are copied afresh
        // from the installed data, unless the range was frozen here; a
        // target being filled here takes its data from the snapshot
        // (`split::mirror`).
        let mirrored_target = match &*self.state.read().map_err(|_| io::Error::other("state lock poisoned"))? {
            SmState::Shard(s) => s.incoming.as_ref().is_some_and(|i| i.mirror_of.is_some()),
            SmState::Meta(_) => false,
        };
        let mirrors = self.mirrors.clone();
        let installed = tokio::task::spawn_blocking(move || {
            mirrors.reset_for_install(&db, group)?;
            if mirrored_target {
                mirrors.target_installing(&db, group)?;
            }
            let result = snapshot::install(&db, group, &file, &inc);
            if result.is_ok() {
                // A failed install stays announced (and on disk): it is
                // redone when the replica opens again.
                mirrors.installed(group);
            }
            let (sm_state, stats) = result?;
            inc.write(|| {
                snapshot::adopt(&root, group, &file)?;
                // Reading a directory stored in the old form rewrites it:
                // a write, so inside the incarnation too.
                Ok((SmState::read(&db, group, &sm_state)?, stats))
            })
        })
        .await
        .map_err(io_err)
        .and_then(|r| r);
        self.incarnation.write(|| {
            let mut state = self.state.write().map_err(|_| io::Error::other("state lock poisoned"))?;
            // A failed install leaves the flag set: the replica stops
            // (openraft treats the error as fatal) and serves nothing more.
            let (new_state, (keys, bytes)) = installed.inspect_err(|e| self.fail("installing a snapshot", e))?;
            self.stats.set(keys, bytes);
            // Backfill files staged here and never ingested are of no use
            // once the snapshot brought the data (or the split went by).
            let waiting = matches!(&new_state,
                SmState::Shard(s) if s.incoming.as_ref().is_some_and(|i| i.backfill.is_none()));
            if !waiting {
                crate::split::receive::remove_staged(&self.snapshot_root, self.group);
            }
            if let SmState::Shard(s) = &new_state {
                self.clock.observe(s.last_ts);
                self.resolved.send_replace(s.resolved());
            }
            *state = new_state;
            self.installing.store(false, Ordering::SeqCst);
            Ok(())
        })
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<TypeConfig, SnapshotFile>>, io::Error> {
        Ok(snapshot::latest(&self.snapshot_root, self.group)?.map(|(meta, snapshot)| SnapshotOf::<
            TypeConfig,
            SnapshotFile,
        > {
            meta,
            snapshot,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use cleave_metadata::OpId;
    use openraft::alias::EntryOf;
    use openraft::entry::RaftEntry;

    use super::*;
    use crate::command::{KvCommand, KvOp, ShardCommand};
    use crate::kv::ShardState;
    use crate::raft::{GroupRaft, GroupStats, RaftContext};
    use crate::storage::ValueRecord;
    use crate::testing::{group_data, group_meta, log_id, temp_db, whole_shard};

    const G: u64 = 7;

    /// A state machine of group `G` over `db`, as `GroupRaft::open` makes it
    /// (the group's state is recorded first, as `GroupRaft::create` does).
    fn machine(db: Arc<Db>, root: PathBuf, state: SmState) -> GroupSm {
        db.put_cf(storage::cf(&db, CF_GROUP_META), state_key(G, tag::SM_STATE), state.to_json().unwrap()).unwrap();
        GroupSm {
            db,
            group: G,
            state: Arc::new(RwLock::new(state)),
            snapshot_root: root,
            stats: Arc::default(),
            incarnation: Arc::default(),
            installing: Arc::default(),
            failed: Arc::default(),
            mirrors: Arc::default(),
            clock: Arc::default(),
            resolved: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    fn kv(index: u64, range_epoch: u64, op: KvOp) -> EntryOf<TypeConfig> {
        EntryOf::<TypeConfig>::new_normal(
            log_id(1, index),
            Command::Kv(KvCommand { range_id: 1, epoch: range_epoch, op }),
        )
    }

    fn put(index: u64, key: &str, value: &str) -> EntryOf<TypeConfig> {
        kv(index, 1, KvOp::Put { key: key.into(), value: value.into(), if_version: None })
    }

    fn step(index: u64, cmd: ShardCommand) -> EntryOf<TypeConfig> {
        EntryOf::<TypeConfig>::new_normal(log_id(1, index), Command::Shard(cmd))
    }

    fn voters() -> openraft::Membership<u64, crate::raft::ReplicaNode> {
        openraft::Membership::new_with_defaults(vec![BTreeSet::from([1, 2, 3])], [])
    }

    /// Applies `entries` as openraft does, in one call, without responders.
    async fn apply(sm: &mut GroupSm, entries: Vec<EntryOf<TypeConfig>>) {
        sm.apply(futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))))).await.unwrap();
    }

    const OP: OpId = 5;

    /// A history touching every kind of entry: blank, membership, puts, a
    /// capture (state change), a logged write, a delete, a refused write.
    fn history() -> Vec<EntryOf<TypeConfig>> {
        vec![
            EntryOf::<TypeConfig>::new_blank(log_id(1, 1)),
            EntryOf::<TypeConfig>::new_membership(log_id(1, 2), voters()),
            put(3, "a", "1"),
            put(4, "b", "\"bee\""),
            step(5, ShardCommand::BeginCapture { op_id: OP, start: "m".into(), end: None, target: 9 }),
            put(6, "n", "2"),
            kv(7, 1, KvOp::Delete { key: "a".into(), if_version: None }),
            kv(8, 2, KvOp::Put { key: "x".into(), value: "1".into(), if_version: None }),
        ]
    }

    fn shard_state(sm: &GroupSm) -> ShardState {
        match &*sm.state.read().unwrap() {
            SmState::Shard(s) => s.clone(),
            SmState::Meta(_) => panic!("not a shard"),
        }
    }

    #[tokio::test]
    async fn one_apply_call_stores_data_state_stats_and_applied_id_together() {
        let (d, db) = temp_db();
        let mut sm = machine(db.clone(), d.path().join("snapshots"), SmState::Shard(whole_shard()));
        apply(&mut sm, history()).await;
        let (applied, membership) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 8)), "a refused write still counts as applied");
        assert_eq!(membership, StoredMembershipOf::<TypeConfig>::new(Some(log_id(1, 2)), voters()));
        // The state in memory, with the capture, is the one stored.
        let state = shard_state(&sm);
        assert_eq!(state.captures.iter().map(|c| c.op_id).collect::<Vec<_>>(), vec![OP]);
        let stored = SmState::from_json(&group_meta(&db, G, tag::SM_STATE).unwrap()).unwrap();
        assert_eq!(stored, SmState::Shard(state));
        // b and n are live ("b" + "\"bee\"", "n" + "2"); a is a tombstone;
        // the write on the stale route (epoch 2) stored nothing.
        assert_eq!(sm.stats.get(), (2, 6 + 2));
        assert_eq!(group_meta(&db, G, tag::KEYS).map(|k| GroupStats::decode(&k)), Some((2, 8)));
        assert_eq!(crate::kv::read(&db, G, "a").unwrap(), Some(ValueRecord::deleted(2)));
        assert_eq!(crate::kv::read(&db, G, "x").unwrap(), None);
        let forward = crate::kv::forward_key(G, OP, 6);
        assert!(group_data(&db, G).iter().any(|(k, _)| *k == forward), "the write to [m, ∞) is logged");
    }

    #[tokio::test]
    async fn a_snapshot_built_by_one_replica_installs_into_another() {
        let (d, db) = temp_db();
        let mut a = machine(db.clone(), d.path().join("snapshots"), SmState::Shard(whole_shard()));
        apply(&mut a, history()).await;
        let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 8)));

        // A lagging replica elsewhere, with data of its own.
        let (d2, db2) = temp_db();
        let mut b = machine(db2.clone(), d2.path().join("snapshots"), SmState::Shard(whole_shard()));
        apply(&mut b, vec![put(1, "stale", "1"), put(2, "a", "7")]).await;
        b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();

        assert_eq!(shard_state(&b), shard_state(&a));
        assert_eq!(b.stats.get(), a.stats.get());
        assert_eq!(b.applied_state().await.unwrap(), a.applied_state().await.unwrap());
        assert_eq!(group_data(&db2, G), group_data(&db, G), "the data, tombstones and forward log included");
        assert!(!b.installing.load(Ordering::SeqCst), "serves again once installed");
        let current = b.get_current_snapshot().await.unwrap().expect("kept to send on");
        assert_eq!(current.meta, snap.meta);
        // And it goes on applying from there.
        apply(&mut b, vec![put(9, "c", "3")]).await;
        assert_eq!(b.stats.get(), (3, 8 + 2));
    }

    fn meta(index: u64, cmd: cleave_metadata::MetaCommand) -> EntryOf<TypeConfig> {
        EntryOf::<TypeConfig>::new_normal(log_id(1, index), Command::Meta(cmd))
    }

    fn directory(sm: &GroupSm) -> cleave_metadata::Directory {
        match &*sm.state.read().unwrap() {
            SmState::Meta(d) => d.clone(),
            SmState::Shard(_) => panic!("not the metadata group"),
        }
    }

    #[tokio::test]
    async fn the_metadata_group_stores_its_directory_by_record_and_ships_it_in_snapshots() {
        use cleave_metadata::{Directory, MetaCommand, Phase};
        let boot = || Directory::bootstrap(&[(1, "a:1".into()), (2, "a:2".into()), (3, "a:3".into())], 3);
        let (d, db) = temp_db();
        let mut a = machine(db.clone(), d.path().join("snapshots"), SmState::Meta(boot()));
        // What `GroupRaft::open` reads: the whole state, rewritten by record.
        let raw = group_meta(&db, G, tag::SM_STATE).unwrap();
        assert_eq!(SmState::read(&db, G, &raw).unwrap(), SmState::Meta(boot()));
        let plan = crate::testing::plan_split("m");
        let advance = |i, from, to| meta(i, MetaCommand::AdvanceOp { op_id: 1, from, to, now_ms: 2 });
        apply(
            &mut a,
            vec![
                meta(1, plan),
                advance(2, Phase::Planned, Phase::Created),
                advance(3, Phase::Created, Phase::Capturing),
                advance(4, Phase::Capturing, Phase::Frozen),
                meta(5, MetaCommand::CommitSplit { op_id: 1, now_ms: 3 }),
                // Refused: the operation is past its planning.
                advance(6, Phase::Planned, Phase::Created),
            ],
        )
        .await;
        let dir = directory(&a);
        assert_eq!(dir.ranges.len(), 2);
        let raw = group_meta(&db, G, tag::SM_STATE).unwrap();
        let header = crate::raft::stored_header(&raw).expect("a directory header");
        assert!(header.ranges.is_empty() && header.shards.is_empty(), "the header alone is one record");
        assert_eq!(
            SmState::read(&db, G, &raw).unwrap(),
            SmState::Meta(dir.clone()),
            "records and header are the state"
        );

        // A replica elsewhere, behind, catches up by snapshot.
        let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let (d2, db2) = temp_db();
        let mut b = machine(db2.clone(), d2.path().join("snapshots"), SmState::Meta(boot()));
        let join = MetaCommand::RegisterNode { node_id: Some(4), raft_addr: "a:4".into(), api_addr: None };
        apply(&mut b, vec![meta(1, join)]).await;
        assert_eq!(directory(&b).nodes.len(), 4, "b's own history");
        b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
        assert_eq!(directory(&b), dir);
        let raw = group_meta(&db2, G, tag::SM_STATE).unwrap();
        assert_eq!(SmState::read(&db2, G, &raw).unwrap(), SmState::Meta(dir), "stored as installed");
    }

    #[tokio::test]
    async fn a_replica_that_catches_up_by_snapshot_mid_split_goes_on_logging_for_the_target() {
        let (d, db) = temp_db();
        let mut a = machine(db.clone(), d.path().join("snapshots"), SmState::Shard(whole_shard()));
        apply(&mut a, history()).await;
        let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let (d2, db2) = temp_db();
        let mut b = machine(db2.clone(), d2.path().join("snapshots"), SmState::Shard(whole_shard()));
        b.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
        // The same entries after the snapshot reach both replicas.
        let after = || vec![put(9, "o", "3"), put(10, "b", "4")];
        apply(&mut a, after()).await;
        apply(&mut b, after()).await;
        let forward = |db: &Db| {
            let (from, to) = (crate::kv::forward_key(G, OP, 0), crate::kv::forward_key(G, OP + 1, 0));
            group_data(db, G).into_iter().filter(|(k, _)| *k >= from && *k < to).map(|(k, _)| k).collect::<Vec<_>>()
        };
        assert_eq!(forward(&db2), vec![crate::kv::forward_key(G, OP, 6), crate::kv::forward_key(G, OP, 9)]);
        assert_eq!(forward(&db2), forward(&db));
        assert_eq!(shard_state(&b).captures, shard_state(&a).captures, "the capture's changes too");
        assert_eq!(group_data(&db2, G), group_data(&db, G));
    }

    /// A node's context over the database in `dir` (needs a runtime).
    fn context(db: Arc<Db>, root: PathBuf) -> RaftContext {
        RaftContext {
            addresses: Default::default(),
            syncer: storage::Syncer::start(db.clone()),
            db,
            transport: crate::rpc::Transport::new(),
            snapshot_root: root,
            settings: crate::raft::RaftSettings {
                heartbeat_ms: 100,
                election_timeout_ms: 1000,
                snapshot_logs: 1000,
                keep_logs: 100,
                dormant_after_ms: 0,
            },
            awake: Default::default(),
            mirrors: Default::default(),
            clock: Default::default(),
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    }

    #[test]
    fn a_replica_reopened_after_a_crash_mid_install_serves_the_snapshot() {
        // The snapshot a leader sends, from a replica that applied the history.
        let (d, src) = temp_db();
        let rt = runtime();
        let (snap, expected) = rt.block_on(async {
            let mut a = machine(src.clone(), d.path().join("snapshots"), SmState::Shard(whole_shard()));
            apply(&mut a, history()).await;
            // Enough data for the install to take several write batches.
            let padding = "p".repeat(100);
            apply(&mut a, (9..209).map(|i| put(i, &format!("k{i:03}"), &format!("\"{padding}\""))).collect()).await;
            let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
            (snap, (SmState::Shard(shard_state(&a)), a.stats.get()))
        });
        drop(rt);

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("snapshots");
        let db_dir = dir.path().join("db");
        {
            // The follower receives the snapshot into a transfer file and
            // dies in the middle of installing it.
            let db = storage::open(&db_dir).unwrap();
            let rt = runtime();
            rt.block_on(async {
                let ctx = context(db.clone(), root.clone());
                let g = GroupRaft::create(&ctx, G, 1, SmState::Shard(whole_shard())).await.unwrap();
                let stale = ValueRecord::live(1, b"1".to_vec());
                db.put_cf(storage::cf(&db, storage::CF_DATA), storage::data_key(G, b"stale"), stale.encode()).unwrap();
                g.shutdown().await;
                let part = snapshot::receive_path(&root, G, 1).unwrap();
                std::fs::copy(&snap.snapshot.path, &part).unwrap();
                let file = snapshot::finish_receive(&part).unwrap();
                snapshot::crash::after_batches(1);
                snapshot::install(&db, G, &file, &Incarnation::default()).unwrap_err();
                assert!(group_meta(&db, G, tag::INSTALLING).is_some());
                let now = group_data(&db, G);
                assert!(!now.is_empty() && now.len() < group_data(&src, G).len(), "stopped half way");
            });
            drop(rt);
            assert_eq!(Arc::strong_count(&db), 1, "the database closes before the restart");
        }

        let db = storage::open(&db_dir).unwrap();
        let rt = runtime();
        rt.block_on(async {
            let ctx = context(db.clone(), root.clone());
            let desc = GroupRaft::list(&db).unwrap().into_iter().find(|d| d.group == G).unwrap();
            let g = GroupRaft::open(&ctx, desc).await.unwrap();
            assert_eq!((g.state.read().unwrap().clone(), g.stats.get()), expected);
            assert_eq!(group_data(&db, G), group_data(&src, G));
            assert_eq!(group_meta(&db, G, tag::INSTALLING), None);
            let (meta, _) = snapshot::latest(&root, G).unwrap().expect("the received file is kept as current");
            assert_eq!(meta, snap.meta);
            g.shutdown().await;
        });
    }

    /// A stored record: user key, stored bytes.
    type Record = (Vec<u8>, Vec<u8>);

    /// Backfill files of a split into `G` (operation `OP`, attempt 3),
    /// staged under `root` as a target replica's node stages them. Returns
    /// the command naming them and the records they hold.
    fn staged_backfill(root: &std::path::Path) -> (ShardCommand, Vec<Record>, tempfile::TempDir) {
        use crate::split::sst;
        let (src_dir, src) = crate::testing::split_source(120, OP, G);
        let out = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        let w = sst::write_files(
            &src,
            crate::testing::GROUP,
            G,
            OP,
            3,
            ("m", None),
            out.path(),
            &mut sst::RateLimit::new(0),
            |n, p, len, _| {
                crate::split::receive::stage_local(root, G, OP, 3, n, &p)?;
                let (_, hash) = sst::file_hash(&p)?;
                files.push(sst::SstFile { len, hash });
                Ok(())
            },
        )
        .unwrap();
        let moving: Vec<_> = group_data(&src, crate::testing::GROUP)
            .into_iter()
            .filter(|(k, _)| &k[8..] >= b"m".as_slice() && *k < crate::kv::user_data_end(crate::testing::GROUP))
            .map(|(k, v)| (k[8..].to_vec(), v))
            .collect();
        (w.command(OP, 3, files), moving, src_dir)
    }

    fn receiving() -> SmState {
        SmState::Shard(ShardState {
            incoming: Some(crate::kv::Incoming::new(OP, "m".into(), None)),
            ..Default::default()
        })
    }

    fn user_data(db: &Db) -> Vec<Record> {
        group_data(db, G)
            .into_iter()
            .filter(|(k, _)| *k < crate::kv::user_data_end(G))
            .map(|(k, v)| (k[8..].to_vec(), v))
            .collect()
    }

    #[tokio::test]
    async fn backfill_files_are_ingested_in_log_order_and_recorded() {
        let (d, db) = temp_db();
        let root = d.path().join("snapshots");
        let (cmd, moving, _src) = staged_backfill(&root);
        let mut sm = machine(db.clone(), root.clone(), receiving());
        let ShardCommand::BackfillFiles { digest, live, .. } = cmd.clone() else { unreachable!() };
        // A forwarded write after the backfill (a newer version of a copied
        // key) lands over the ingested record, never under it.
        let (key, _) = &moving[0];
        let key = String::from_utf8(key.clone()).unwrap();
        let newer = ValueRecord::live(1000, b"\"new\"".to_vec());
        let ingest =
            ShardCommand::Ingest { op_id: OP, source_index: Some(500), records: vec![(key.clone(), newer.encode())] };
        apply(&mut sm, vec![EntryOf::<TypeConfig>::new_blank(log_id(1, 1)), step(2, cmd.clone()), step(3, ingest)])
            .await;
        let mut expect = moving.clone();
        expect[0].1 = newer.encode();
        assert_eq!(user_data(&db), expect, "the files' records, then the forwarded write over them");
        let inc = match &*sm.state.read().unwrap() {
            SmState::Shard(s) => s.incoming.clone().unwrap(),
            _ => unreachable!(),
        };
        assert!(inc.backfill.is_some() && inc.watermark == 500);
        let old = ValueRecord::decode(&moving[0].1).unwrap();
        assert_eq!(inc.digest, digest.wrapping_add(crate::split::digest::delta(&key, Some(&old), &newer)));
        assert_eq!(sm.stats.get().0, live.0, "the live keys the files hold");
        assert!(
            db.get_cf(storage::cf(&db, storage::CF_DATA), crate::kv::backfill_marker_key(G, OP)).unwrap().is_none(),
            "the marker goes with the entry's batch"
        );
        // The entry again (a second attempt's, or a redelivery): recorded
        // already, nothing ingested, nothing needed.
        apply(&mut sm, vec![step(4, cmd)]).await;
        assert_eq!(user_data(&db), expect);
        assert!(!sm.failed.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_replay_after_a_crash_between_ingest_and_batch_ingests_nothing_twice() {
        let (d, db) = temp_db();
        let root = d.path().join("snapshots");
        let (cmd, moving, _src) = staged_backfill(&root);
        let ShardCommand::BackfillFiles { files, .. } = &cmd else { unreachable!() };
        // The ingest landed, the batch recording the entry did not.
        crate::split::sst::ingest_staged(&db, &root, G, OP, 3, files).unwrap();
        let mut sm = machine(db.clone(), root, receiving());
        apply(&mut sm, vec![step(2, cmd.clone())]).await;
        assert_eq!(user_data(&db), moving);
        assert!(
            matches!(&*sm.state.read().unwrap(), SmState::Shard(s) if s.incoming.as_ref().unwrap().backfill.is_some())
        );
    }

    #[tokio::test]
    async fn a_replica_without_the_files_stops_rather_than_apply_the_entry() {
        let (d, db) = temp_db();
        let other = tempfile::tempdir().unwrap();
        let (cmd, _, _src) = staged_backfill(other.path());
        let mut sm = machine(db.clone(), d.path().join("snapshots"), receiving());
        let r = sm.apply(futures::stream::iter(vec![Ok((step(2, cmd), None))])).await;
        assert!(r.is_err(), "the entry cannot be applied here");
        assert!(sm.failed.load(Ordering::SeqCst), "the replica stops");
        assert!(
            matches!(&*sm.state.read().unwrap(), SmState::Shard(s) if s.incoming.as_ref().unwrap().backfill.is_none())
        );
    }

    #[tokio::test]
    async fn an_ended_incarnation_changes_neither_storage_nor_the_shared_state() {
        let (d, db) = temp_db();
        let mut sm = machine(db.clone(), d.path().join("snapshots"), SmState::Shard(whole_shard()));
        sm.incarnation.end();
        let r = sm.apply(futures::stream::iter(vec![Ok((put(1, "a", "1"), None))])).await;
        assert!(r.is_err());
        assert!(group_data(&db, G).is_empty(), "nothing written");
        assert_eq!(sm.stats.get(), (0, 0), "the stats it shares are untouched");
        assert!(!sm.failed.load(Ordering::SeqCst), "an ended instance is not a failed replica");
    }
}
