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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use futures::{Stream, TryStreamExt};
use openraft::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};

use super::snapshot::{self, SnapshotFile};
use super::{SmState, TypeConfig};
use crate::command::{Command, CommandResponse};
use crate::kv;
use crate::storage::{self, io_err, state_key, tag, Db, CF_GROUP_META};

fn encode<T: serde::Serialize>(v: &T) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(io_err)
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    bincode::serde::decode_from_slice(b, bincode::config::standard()).map(|(v, _)| v).map_err(io_err)
}

/// State machine of one group.
pub struct GroupSm {
    pub(super) db: Arc<Db>,
    pub(super) group: u64,
    pub(super) state: Arc<RwLock<SmState>>,
    pub(super) snapshot_root: PathBuf,
    /// Live keys in the group (shards), kept in step with applied entries.
    pub(super) keys: Arc<AtomicU64>,
}

impl GroupSm {
    fn meta_get<T: serde::de::DeserializeOwned>(&self, t: u8) -> io::Result<Option<T>> {
        let cf = storage::cf(&self.db, CF_GROUP_META);
        self.db.get_pinned_cf(cf, state_key(self.group, t)).map_err(io_err)?.map(|b| decode(&b)).transpose()
    }

    fn apply_command(
        &self,
        state: &mut SmState,
        overlay: &mut kv::Overlay,
        batch: &mut rocksdb::WriteBatch,
        changed: &mut bool,
        key_delta: &mut i64,
        cmd: &Command,
    ) -> CommandResponse {
        match (cmd, state) {
            (Command::Kv(c), SmState::Shard(s)) => {
                let r = kv::apply(&self.db, self.group, s, overlay, batch, c);
                let op = if matches!(c.op, crate::command::KvOp::Put { .. }) { "put" } else { "delete" };
                metrics::counter!("cleave_applied_writes_total", "shard" => self.group.to_string(), "op" => op)
                    .increment(1);
                CommandResponse::Kv(r.map(|(version, delta)| {
                    *key_delta += delta;
                    version
                }))
            }
            (Command::Meta(c), SmState::Meta(d)) => {
                let r = d.apply(c);
                *changed |= r.is_ok();
                CommandResponse::Meta(r)
            }
            (cmd, _) => CommandResponse::Rejected(format!("group {} cannot apply {cmd:?}", self.group)),
        }
    }
}

/// Builds snapshots in the background from a consistent RocksDB snapshot.
pub struct SnapshotBuilder {
    db: Arc<Db>,
    group: u64,
    root: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotFile>, io::Error> {
        let (db, group, root) = (self.db.clone(), self.group, self.root.clone());
        let (meta, file) =
            tokio::task::spawn_blocking(move || snapshot::build(&db, group, &root)).await.map_err(io_err)??;
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
        let mut batch = rocksdb::WriteBatch::default();
        let mut overlay = kv::Overlay::new();
        let mut responses = Vec::new();
        let mut last_applied = None;
        let mut membership = None;
        let mut changed = false;
        let mut key_delta = 0i64;
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
                        self.apply_command(&mut state, &mut overlay, &mut batch, &mut changed, &mut key_delta, cmd)
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
                batch.put_cf(meta_cf, state_key(self.group, tag::APPLIED), encode(l)?);
            }
            if let Some(m) = &membership {
                batch.put_cf(meta_cf, state_key(self.group, tag::MEMBERSHIP), encode(m)?);
            }
            if changed {
                batch.put_cf(meta_cf, state_key(self.group, tag::SM_STATE), state.to_json()?);
            }
            let keys = (self.keys.load(Ordering::Relaxed) as i64 + key_delta).max(0) as u64;
            if key_delta != 0 {
                batch.put_cf(meta_cf, state_key(self.group, tag::KEYS), keys.to_be_bytes());
            }
            self.db.write(batch).map_err(io_err)?;
            self.keys.store(keys, Ordering::Relaxed);
        }
        for (responder, resp) in responses {
            responder.send(resp);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { db: self.db.clone(), group: self.group, root: self.snapshot_root.clone() }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        file: SnapshotFile,
    ) -> Result<(), io::Error> {
        tracing::info!(group = self.group, last = ?meta.last_log_id, "installing snapshot");
        let (db, group) = (self.db.clone(), self.group);
        let root = self.snapshot_root.clone();
        let (sm_state, keys) = tokio::task::spawn_blocking(move || {
            let r = snapshot::install(&db, group, &file)?;
            snapshot::adopt(&root, group, &file)?;
            Ok::<_, io::Error>(r)
        })
        .await
        .map_err(io_err)??;
        let new_state = SmState::from_json(&sm_state)?;
        self.keys.store(keys, Ordering::Relaxed);
        *self.state.write().map_err(|_| io::Error::other("state lock poisoned"))? = new_state;
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
