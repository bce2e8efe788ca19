//! The key-value logic of a shard's state machine: ownership (fencing),
//! versions, compare-and-set and tombstones.
//!
//! [`ShardState`] is the part of a shard's state that is not user data: the
//! ranges it owns and their epochs. It is replicated (it changes only through
//! applied entries or snapshots) and kept in memory for fast checks.

use std::collections::HashMap;

use cleave_metadata::RangeDescriptor;
use serde::{Deserialize, Serialize};

use crate::command::{KvCommand, KvError, KvOp};
use crate::storage::{self, data_key, Db, ValueRecord};

/// The ranges a shard owns.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ShardState {
    pub ranges: Vec<RangeDescriptor>,
}

impl ShardState {
    /// The owned range containing `key`.
    pub fn owner(&self, key: &str) -> Option<&RangeDescriptor> {
        self.ranges.iter().find(|r| r.contains(key))
    }

    /// Checks that `key` is owned here through range `range_id` at `epoch`.
    pub fn check_route(&self, key: &str, range_id: u64, epoch: u64) -> Result<&RangeDescriptor, KvError> {
        match self.owner(key) {
            Some(r) if r.range_id == range_id && r.epoch == epoch => Ok(r),
            _ => Err(KvError::WrongRange { ranges: self.ranges.clone() }),
        }
    }
}

/// Reads the stored record of `key` in `group`.
pub fn read(db: &Db, group: u64, key: &str) -> Result<Option<ValueRecord>, rocksdb::Error> {
    let cf = storage::cf(db, storage::CF_DATA);
    Ok(db.get_pinned_cf(cf, data_key(group, key.as_bytes()))?.and_then(|v| ValueRecord::decode(&v)))
}

/// Records written earlier in the same apply batch, which RocksDB cannot
/// see yet; consulted before the database.
pub type Overlay = HashMap<String, ValueRecord>;

/// Applies one KV command into `batch`. Returns the key's new version and
/// the change in the shard's number of live keys (-1, 0 or +1).
pub fn apply(
    db: &Db,
    group: u64,
    state: &ShardState,
    overlay: &mut Overlay,
    batch: &mut rocksdb::WriteBatch,
    cmd: &KvCommand,
) -> Result<(u64, i64), KvError> {
    let key = cmd.key();
    state.check_route(key, cmd.range_id, cmd.epoch)?;
    let current = match overlay.get(key) {
        Some(r) => Some(r.clone()),
        None => read(db, group, key).map_err(|_| KvError::NotFound)?,
    };
    let live = ValueRecord::live_version(current.as_ref());
    let last = current.as_ref().map_or(0, |r| r.version);
    let (if_version, record) = match &cmd.op {
        KvOp::Put { value, if_version, .. } => {
            (*if_version, ValueRecord { version: last + 1, tombstone: false, json: value.as_bytes().to_vec() })
        }
        KvOp::Delete { if_version, .. } => {
            if live == 0 {
                return Err(if if_version.is_some_and(|v| v != 0) {
                    KvError::VersionConflict { current: 0 }
                } else {
                    KvError::NotFound
                });
            }
            (*if_version, ValueRecord { version: last + 1, tombstone: true, json: Vec::new() })
        }
    };
    if let Some(expected) = if_version {
        if expected != live {
            return Err(KvError::VersionConflict { current: live });
        }
    }
    batch.put_cf(storage::cf(db, storage::CF_DATA), data_key(group, key.as_bytes()), record.encode());
    let version = record.version;
    let delta = match (live, record.tombstone) {
        (0, false) => 1,
        (0, true) => 0,
        (_, true) => -1,
        (_, false) => 0,
    };
    overlay.insert(key.to_string(), record);
    Ok((version, delta))
}

/// One live item returned by a scan.
pub struct ScannedItem {
    pub key: String,
    pub record: ValueRecord,
}

/// Live items of `group` in `[start, end)`, at most `limit`.
pub fn scan(
    db: &Db,
    group: u64,
    start: &str,
    end: Option<&str>,
    limit: usize,
) -> Result<Vec<ScannedItem>, rocksdb::Error> {
    let cf = storage::cf(db, storage::CF_DATA);
    let mut opts = rocksdb::ReadOptions::default();
    let upper = match end {
        Some(e) => data_key(group, e.as_bytes()),
        None => storage::group_range_end(group),
    };
    opts.set_iterate_upper_bound(upper);
    let iter = db.iterator_cf_opt(
        cf,
        opts,
        rocksdb::IteratorMode::From(&data_key(group, start.as_bytes()), rocksdb::Direction::Forward),
    );
    let mut out = Vec::new();
    for item in iter {
        let (k, v) = item?;
        let Some(record) = ValueRecord::decode(&v) else { continue };
        if record.tombstone {
            continue;
        }
        let key = String::from_utf8_lossy(storage::user_key_of(&k)).into_owned();
        out.push(ScannedItem { key, record });
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}
