//! openraft's log storage for one group, on the node's shared RocksDB.
//!
//! Entries live in `raft_log` under `group · index`; the vote, the committed
//! log id and the purge point live in `raft_state`. An append is written
//! without fsync and reported flushed only after the node's [`Syncer`] has
//! synced the WAL, so one fsync serves every group that appended meanwhile.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use super::incarnation::Incarnation;
use super::TypeConfig;
use crate::storage::{self, io_err, log_key, state_key, tag, Db, Syncer, CF_RAFT_LOG, CF_RAFT_STATE};

/// Log store of one group. Cheap to clone; clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Db>,
    group: u64,
    syncer: Syncer,
    incarnation: Arc<Incarnation>,
}

use crate::codec::{decode, encode};

impl LogStore {
    pub fn new(db: Arc<Db>, group: u64, syncer: Syncer, incarnation: Arc<Incarnation>) -> LogStore {
        LogStore { db, group, syncer, incarnation }
    }

    /// Runs a storage write of this replica (refused once it was stopped).
    fn write(&self, f: impl FnOnce(&Db) -> Result<(), rocksdb::Error>) -> Result<(), io::Error> {
        self.incarnation.write(|| f(&self.db).map_err(io_err))
    }

    fn get_state<T: serde::de::DeserializeOwned>(&self, t: u8) -> Result<Option<T>, io::Error> {
        storage::get_decoded(&self.db, CF_RAFT_STATE, &state_key(self.group, t))
    }

    fn put_state<T: serde::Serialize>(&self, t: u8, v: &T) -> Result<(), io::Error> {
        let bytes = encode(v)?;
        self.write(|db| db.put_cf(storage::cf(db, CF_RAFT_STATE), state_key(self.group, t), bytes))
    }

    fn last_entry(&self) -> Result<Option<EntryOf<TypeConfig>>, io::Error> {
        let cf = storage::cf(&self.db, CF_RAFT_LOG);
        let mut it = self.db.raw_iterator_cf(cf);
        it.seek_for_prev(log_key(self.group, u64::MAX));
        if it.valid() {
            if let (Some(k), Some(v)) = (it.key(), it.value()) {
                if k[..8] == self.group.to_be_bytes() {
                    return Ok(Some(decode(v)?));
                }
            }
        }
        it.status().map_err(io_err)?;
        Ok(None)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(i + 1),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        let cf = storage::cf(&self.db, CF_RAFT_LOG);
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(match end {
            Some(e) => log_key(self.group, e).to_vec(),
            None => storage::group_range_end(self.group),
        });
        let mut out = Vec::new();
        let from = log_key(self.group, start);
        for item in self.db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward)) {
            let (_, v) = item.map_err(io_err)?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        self.get_state(tag::VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogIdOf<TypeConfig>> = self.get_state(tag::PURGED)?;
        let last_log_id = match self.last_entry()? {
            Some(e) => Some(e.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        self.put_state(tag::VOTE, vote)?;
        self.syncer.sync().await
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        self.put_state(tag::COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        Ok(self.get_state::<Option<LogIdOf<TypeConfig>>>(tag::COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = storage::cf(&self.db, CF_RAFT_LOG);
        let mut batch = rocksdb::WriteBatch::default();
        for entry in entries {
            batch.put_cf(cf, log_key(self.group, entry.log_id.index), encode(&entry)?);
        }
        self.write(|db| db.write(batch))?;
        self.syncer.after_sync(move |r| callback.io_completed(r));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        self.write(|db| {
            let cf = storage::cf(db, CF_RAFT_LOG);
            db.delete_range_cf(cf, log_key(self.group, from).to_vec(), storage::group_range_end(self.group))
        })?;
        self.syncer.sync().await
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        let cf = storage::cf(&self.db, CF_RAFT_LOG);
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(storage::cf(&self.db, CF_RAFT_STATE), state_key(self.group, tag::PURGED), encode(&log_id)?);
        batch.delete_range_cf(cf, log_key(self.group, 0), log_key(self.group, log_id.index + 1));
        self.write(|db| db.write(batch))
    }
}
