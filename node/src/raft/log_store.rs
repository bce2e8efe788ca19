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
        // Bounded below by the group's own first key: with its log purged,
        // an unbounded seek walks back through every purged entry (and
        // range tombstone) of the groups before it.
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_lower_bound(log_key(self.group, 0));
        let mut it = self.db.raw_iterator_cf_opt(cf, opts);
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

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::path::Path;

    use openraft::entry::RaftEntry;
    use openraft::type_config::TypeConfigExt;

    use super::*;
    use crate::testing::log_id;

    /// Runs `f` against the database in `dir` in a runtime of its own, then
    /// closes the database: the next session reopens it as a restarted node
    /// does, so only what reached RocksDB carries over.
    fn session<T, F: Future<Output = T>>(dir: &Path, f: impl FnOnce(Arc<Db>, Syncer) -> F) -> T {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let db = storage::open(dir).unwrap();
        let out = rt.block_on(async { f(db.clone(), Syncer::start(db.clone())).await });
        drop(rt);
        assert_eq!(Arc::strong_count(&db), 1, "the database closes at the end of a session");
        out
    }

    fn store(db: &Arc<Db>, syncer: &Syncer, group: u64) -> LogStore {
        LogStore::new(db.clone(), group, syncer.clone(), Arc::default())
    }

    fn blanks(term: u64, indexes: std::ops::RangeInclusive<u64>) -> Vec<EntryOf<TypeConfig>> {
        indexes.map(|i| EntryOf::<TypeConfig>::new_blank(log_id(term, i))).collect()
    }

    /// Appends and waits until the store reports the entries flushed.
    async fn append(s: &mut LogStore, entries: Vec<EntryOf<TypeConfig>>) {
        let (tx, rx) = TypeConfig::oneshot();
        s.append(entries, IOFlushed::signal(tx)).await.unwrap();
        rx.await.expect("the flush is reported").expect("flushed");
    }

    async fn indexes(s: &mut LogStore) -> Vec<u64> {
        s.try_get_log_entries(..).await.unwrap().iter().map(|e| e.log_id.index).collect()
    }

    fn vote(term: u64, node: u64, committed: bool) -> VoteOf<TypeConfig> {
        match committed {
            true => VoteOf::<TypeConfig>::new_committed(term, node),
            false => VoteOf::<TypeConfig>::new(term, node),
        }
    }

    #[test]
    fn the_vote_and_the_committed_id_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        session(dir.path(), |db, sy| async move {
            let mut s = store(&db, &sy, 3);
            s.save_vote(&vote(1, 2, false)).await.unwrap();
            s.save_vote(&vote(4, 1, true)).await.unwrap();
            s.save_committed(Some(log_id(4, 17))).await.unwrap();
        });
        session(dir.path(), |db, sy| async move {
            let mut s = store(&db, &sy, 3);
            assert_eq!(s.read_vote().await.unwrap(), Some(vote(4, 1, true)), "the newest vote, committed");
            assert_eq!(s.read_committed().await.unwrap(), Some(log_id(4, 17)));
            let mut other = store(&db, &sy, 4);
            assert_eq!(other.read_vote().await.unwrap(), None, "votes are per group");
            assert_eq!(other.read_committed().await.unwrap(), None);
        });
    }

    #[test]
    fn a_purge_survives_a_restart_and_keeps_the_entries_after_it() {
        let dir = tempfile::tempdir().unwrap();
        session(dir.path(), |db, sy| async move {
            let mut s = store(&db, &sy, 3);
            append(&mut s, blanks(1, 1..=10)).await;
            s.purge(log_id(1, 4)).await.unwrap();
        });
        session(dir.path(), |db, sy| async move {
            let mut s = store(&db, &sy, 3);
            let st = s.get_log_state().await.unwrap();
            assert_eq!((st.last_purged_log_id, st.last_log_id), (Some(log_id(1, 4)), Some(log_id(1, 10))));
            assert_eq!(indexes(&mut s).await, (5..=10).collect::<Vec<_>>());
        });
    }

    #[test]
    fn a_log_purged_to_its_end_still_knows_its_last_id() {
        let dir = tempfile::tempdir().unwrap();
        session(dir.path(), |db, sy| async move {
            let mut s = store(&db, &sy, 3);
            append(&mut s, blanks(2, 1..=6)).await;
            s.purge(log_id(2, 6)).await.unwrap();
        });
        session(dir.path(), |db, sy| async move {
            let mut s = store(&db, &sy, 3);
            let st = s.get_log_state().await.unwrap();
            assert_eq!((st.last_purged_log_id, st.last_log_id), (Some(log_id(2, 6)), Some(log_id(2, 6))));
            assert!(indexes(&mut s).await.is_empty());
            // The next append continues after the purged entries.
            append(&mut s, blanks(3, 7..=7)).await;
            assert_eq!(s.get_log_state().await.unwrap().last_log_id, Some(log_id(3, 7)));
        });
    }

    #[test]
    fn a_truncation_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        session(dir.path(), |db, sy| async move {
            let mut s = store(&db, &sy, 3);
            append(&mut s, blanks(1, 1..=10)).await;
            s.truncate_after(Some(log_id(1, 6))).await.unwrap();
            // A new leader's entries replace the truncated ones.
            append(&mut s, blanks(2, 7..=8)).await;
        });
        session(dir.path(), |db, sy| async move {
            let mut s = store(&db, &sy, 3);
            assert_eq!(s.get_log_state().await.unwrap().last_log_id, Some(log_id(2, 8)));
            let ids: Vec<_> = s.try_get_log_entries(5..).await.unwrap().iter().map(|e| e.log_id).collect();
            assert_eq!(ids, vec![log_id(1, 5), log_id(1, 6), log_id(2, 7), log_id(2, 8)]);
            s.truncate_after(None).await.unwrap();
            assert!(indexes(&mut s).await.is_empty(), "truncating after nothing empties the log");
        });
    }

    #[test]
    fn groups_sharing_the_database_keep_their_logs_apart() {
        let dir = tempfile::tempdir().unwrap();
        session(dir.path(), |db, sy| async move {
            let (mut a, mut b, mut c) = (store(&db, &sy, 3), store(&db, &sy, 4), store(&db, &sy, 5));
            append(&mut a, blanks(1, 1..=5)).await;
            append(&mut b, blanks(1, 1..=5)).await;
            append(&mut c, blanks(1, 1..=5)).await;
            b.purge(log_id(1, 2)).await.unwrap();
            b.truncate_after(Some(log_id(1, 3))).await.unwrap();
            assert_eq!(indexes(&mut a).await, vec![1, 2, 3, 4, 5], "the group below is untouched");
            assert_eq!(indexes(&mut b).await, vec![3]);
            assert_eq!(indexes(&mut c).await, vec![1, 2, 3, 4, 5], "the group above is untouched");
            assert_eq!(a.get_log_state().await.unwrap().last_purged_log_id, None);
            assert_eq!(a.try_get_log_entries(3..=4).await.unwrap().len(), 2, "ranges stay inside the group");
        });
    }

    #[test]
    fn entries_read_back_after_a_restart_are_those_appended() {
        use crate::command::{Command, KvCommand, KvOp, ShardCommand};
        let dir = tempfile::tempdir().unwrap();
        let voters = openraft::Membership::new_with_defaults(vec![[1, 2].into()], [3]);
        let put = KvOp::Put { key: "k".into(), value: "{\"a\":[1,2]}".into(), if_version: Some(4) };
        let entries = vec![
            EntryOf::<TypeConfig>::new_blank(log_id(1, 1)),
            EntryOf::<TypeConfig>::new_membership(log_id(1, 2), voters),
            EntryOf::<TypeConfig>::new_normal(log_id(1, 3), Command::Kv(KvCommand { range_id: 2, epoch: 3, op: put })),
            EntryOf::<TypeConfig>::new_normal(
                log_id(2, 4),
                Command::Shard(ShardCommand::Ingest {
                    op_id: 5,
                    source_index: Some(9),
                    records: vec![("k".into(), vec![0, 255, 7])],
                }),
            ),
        ];
        let appended = entries.clone();
        session(dir.path(), |db, sy| async move {
            append(&mut store(&db, &sy, 3), appended).await;
        });
        session(dir.path(), |db, sy| async move {
            let mut s = store(&db, &sy, 3);
            assert_eq!(s.try_get_log_entries(1..=4).await.unwrap(), entries);
            assert_eq!(s.try_get_log_entries(2..4).await.unwrap(), entries[1..3].to_vec());
        });
    }

    #[test]
    fn a_stopped_replica_appends_and_votes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        session(dir.path(), |db, sy| async move {
            let inc = Arc::new(Incarnation::default());
            let mut s = LogStore::new(db.clone(), 3, sy.clone(), inc.clone());
            append(&mut s, blanks(1, 1..=2)).await;
            inc.end();
            assert!(s.append(blanks(1, 3..=3), IOFlushed::noop()).await.is_err());
            assert!(s.save_vote(&vote(2, 1, false)).await.is_err());
            assert!(s.truncate_after(None).await.is_err());
            assert!(s.purge(log_id(1, 2)).await.is_err());
            let mut fresh = store(&db, &sy, 3);
            assert_eq!(indexes(&mut fresh).await, vec![1, 2]);
            assert_eq!(fresh.read_vote().await.unwrap(), None);
        });
    }
}
