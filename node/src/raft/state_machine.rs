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
use crate::command::{Command, CommandResponse};
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
    ) -> Result<CommandResponse, rocksdb::Error> {
        Ok(match (cmd, state) {
            (Command::Kv(c), SmState::Shard(s)) => {
                CommandResponse::Kv(kv::apply(&self.db, self.group, index, s, b, c)?)
            }
            (Command::Shard(c), SmState::Shard(s)) => {
                CommandResponse::Shard(crate::split::apply::apply(&self.db, self.group, index, s, b, c)?)
            }
            (Command::Meta(c), SmState::Meta(d)) => {
                let r = d.apply(c);
                b.changed |= r.is_ok();
                CommandResponse::Meta(r)
            }
            (cmd, _) => CommandResponse::Rejected(format!("group {} cannot apply {cmd:?}", self.group)),
        })
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
        let meta_cf = storage::cf(&self.db, CF_GROUP_META);
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
        {
            let mut state = self.state.write().map_err(|_| io::Error::other("state lock poisoned"))?;
            for (entry, responder) in items {
                let log_id = entry.log_id;
                let resp = match &entry.payload {
                    EntryPayload::Blank => CommandResponse::None,
                    EntryPayload::Normal(cmd) => {
                        self.apply_command(&mut state, &mut b, log_id.index, cmd).map_err(|e| {
                            self.fail(&format!("applying entry {}", log_id.index), &e);
                            io_err(e)
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
            if let Some(l) = &last_applied {
                b.write.put_cf(meta_cf, state_key(self.group, tag::APPLIED), encode(l)?);
            }
            if let Some(m) = &membership {
                b.write.put_cf(meta_cf, state_key(self.group, tag::MEMBERSHIP), encode(m)?);
            }
            if b.changed {
                b.write.put_cf(meta_cf, state_key(self.group, tag::SM_STATE), state.to_json()?);
            }
            let (keys, bytes) = self.stats.get();
            let keys = (keys as i64 + b.stats.keys).max(0) as u64;
            let bytes = (bytes as i64 + b.stats.bytes).max(0) as u64;
            if b.stats != kv::StatsDelta::default() {
                b.write.put_cf(meta_cf, state_key(self.group, tag::KEYS), super::GroupStats::encode(keys, bytes));
            }
            self.incarnation.write(|| self.db.write(b.write).map_err(io_err)).inspect_err(|e| {
                if !self.incarnation.has_ended() {
                    self.fail("writing an apply batch", e)
                }
            })?;
            self.stats.set(keys, bytes);
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
        // is half old, half new.
        {
            let _state = self.state.write().map_err(|_| io::Error::other("state lock poisoned"))?;
            self.installing.store(true, Ordering::SeqCst);
        }
        let installed = tokio::task::spawn_blocking(move || {
            let r = snapshot::install(&db, group, &file, &inc)?;
            inc.write(|| snapshot::adopt(&root, group, &file))?;
            Ok::<_, io::Error>(r)
        })
        .await
        .map_err(io_err)
        .and_then(|r| r)
        .and_then(|(sm_state, stats)| Ok((SmState::from_json(&sm_state)?, stats)));
        let mut state = self.state.write().map_err(|_| io::Error::other("state lock poisoned"))?;
        // A failed install leaves the flag set: the replica stops (openraft
        // treats the error as fatal) and serves nothing more.
        let (new_state, (keys, bytes)) = installed.inspect_err(|e| {
            if !self.incarnation.has_ended() {
                self.fail("installing a snapshot", e)
            }
        })?;
        self.stats.set(keys, bytes);
        *state = new_state;
        self.installing.store(false, Ordering::SeqCst);
        Ok(())
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
