//! A shard's change log: one entry per change to a key, keyed by the
//! change's timestamp, kept beside the shard's data so that it is
//! replicated, snapshotted and moved with it.
//!
//! `kv::store` writes the entry in the same batch as the record it
//! describes, whenever a key's version changes (a put, a delete, a
//! transaction's write; a lock taken or released alone changes nothing a
//! watcher sees). The key is `(group, INTERNAL, 'C', ts, user key)`: read in
//! key order it is in timestamp order, and within one timestamp (the
//! writes of one entry, or of one transaction) in key order — exactly the
//! order a watch emits. A key changes at most once per timestamp (one
//! entry writes a key once; a transaction writes each of its keys once), so
//! the pair is unique, and `(ts, key)` is what a watch's cursor names.
//!
//! The log is trimmed by `ShardCommand::TrimChanges` (the leader proposes
//! it: see [`super::trim`]), which deletes every entry at or below a
//! timestamp and records it in the shard's [`ChangeLogState`]: a watch that
//! asks for changes after an older cursor is told the history is gone
//! (`compacted`), never given a silent gap.

use serde::{Deserialize, Serialize};

use crate::clock::Ts;
use crate::kv::INTERNAL;
use crate::storage::{self, data_key, Db, ValueRecord};

const CHANGES: u8 = b'C';

/// What the change log holds of one shard, as part of its replicated state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ChangeLogState {
    /// Every change at or below this timestamp was trimmed.
    pub trimmed_through: Ts,
    /// Bytes of the entries held (keys and values), kept exact by apply.
    pub bytes: u64,
}

/// One change as stored: the key's new version and value (`None`: deleted),
/// and what it replaced (for watchers that ask for previous values).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StoredChange {
    pub version: u64,
    /// The new JSON text; `None` for a delete.
    pub value: Option<Vec<u8>>,
    /// The live value replaced: `(version, JSON text)`.
    pub prev: Option<(u64, Vec<u8>)>,
}

/// A change as read back, with its timestamp and key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub ts: Ts,
    pub key: String,
    pub version: u64,
    pub value: Option<Vec<u8>>,
    pub prev: Option<(u64, Vec<u8>)>,
}

impl Change {
    /// Bytes it holds (what a watcher's queue is bounded by).
    pub fn size(&self) -> usize {
        64 + self.key.len() + self.value.as_ref().map_or(0, Vec::len) + self.prev.as_ref().map_or(0, |p| p.1.len())
    }
}

/// The start of the change log's keys at timestamp `ts` (all keys).
pub fn key_at(group: u64, ts: Ts) -> Vec<u8> {
    let mut k = vec![INTERNAL, CHANGES];
    k.extend_from_slice(&ts.to_be_bytes());
    data_key(group, &k)
}

/// The key of the change of user key `key` at `ts`.
pub fn change_key(group: u64, ts: Ts, key: &str) -> Vec<u8> {
    let mut k = key_at(group, ts);
    k.extend_from_slice(key.as_bytes());
    k
}

/// The end of the change log (exclusive).
fn log_end(group: u64) -> Vec<u8> {
    data_key(group, &[INTERNAL, CHANGES + 1])
}

/// The change `record` replacing `old` makes, if any: only a new version
/// is seen by watchers (a lock taken or released alone is not), and a
/// delete only of a live value (a transaction deleting an absent key
/// leaves a tombstone of a new version, but nothing a watcher had seen
/// went away).
pub fn change_of(old: Option<&ValueRecord>, record: &ValueRecord) -> Option<StoredChange> {
    if old.map_or(0, |o| o.version) == record.version {
        return None;
    }
    if record.tombstone && old.is_none_or(|o| o.tombstone) {
        return None;
    }
    let value = (!record.tombstone).then(|| record.json.clone());
    let prev = old.filter(|o| !o.tombstone).map(|o| (o.version, o.json.clone()));
    Some(StoredChange { version: record.version, value, prev })
}

impl StoredChange {
    pub fn encode(&self) -> Vec<u8> {
        // Integers and byte vectors: encoding cannot fail.
        crate::codec::encode(self).expect("a change encodes")
    }
}

/// Where a change log read stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window<'a> {
    /// Changes strictly after this position: `(ts, None)` is "after all of
    /// `ts`", `(ts, Some(key))` "after `key`'s change at `ts`".
    pub after: (Ts, Option<&'a str>),
    /// Up to and including this timestamp.
    pub through: Ts,
    /// Only keys in `[start, end)`.
    pub start: &'a str,
    pub end: Option<&'a str>,
    /// At most this many changes, and about this many bytes (the change
    /// that passes it is the last).
    pub limit: usize,
    pub bytes: usize,
}

/// Reads `group`'s changes in `w`, in `(ts, key)` order, as of `snap` (or
/// the database now). Answers whether it stopped at the limit.
pub fn read(
    db: &Db,
    snap: Option<&crate::kv::Snapshot<'_>>,
    group: u64,
    w: &Window<'_>,
) -> std::io::Result<(Vec<Change>, bool)> {
    let (mut out, mut bytes) = (Vec::new(), 0);
    if w.after.0 >= w.through && w.after.1.is_none() {
        return Ok((out, false));
    }
    let from = match w.after {
        (ts, None) => key_at(group, ts.saturating_add(1)),
        (ts, Some(k)) => {
            let mut from = change_key(group, ts, k);
            from.push(0); // strictly after `k`
            from
        }
    };
    let upper = key_at(group, w.through.saturating_add(1)).min(log_end(group));
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(if w.through == Ts::MAX { log_end(group) } else { upper });
    if let Some(s) = snap {
        opts.set_snapshot(s);
    }
    let cf = storage::cf(db, storage::CF_DATA);
    let prefix_len = key_at(group, 0).len();
    for item in db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward)) {
        let (k, v) = item.map_err(storage::io_err)?;
        let Some(rest) = k.get(prefix_len - 8..) else { continue };
        let ts = Ts::from_be_bytes(rest[..8].try_into().map_err(|_| std::io::Error::other("a short change key"))?);
        let key = std::str::from_utf8(&rest[8..]).map_err(|_| std::io::Error::other("a change key is not UTF-8"))?;
        if !crate::kv::within(key, w.start, w.end) {
            continue;
        }
        let c: StoredChange = crate::codec::decode(&v)?;
        let change = Change { ts, key: key.to_string(), version: c.version, value: c.value, prev: c.prev };
        bytes += change.size();
        out.push(change);
        if out.len() >= w.limit || bytes >= w.bytes {
            return Ok((out, true));
        }
    }
    Ok((out, false))
}

/// Iterates `group`'s change log from its oldest entry: `(ts, bytes)`.
fn entries(db: &Db, group: u64) -> impl Iterator<Item = std::io::Result<(Ts, u64)>> + '_ {
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(log_end(group));
    let cf = storage::cf(db, storage::CF_DATA);
    let at = key_at(group, 0).len() - 8;
    db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&key_at(group, 0), rocksdb::Direction::Forward)).map(
        move |item| {
            let (k, v) = item.map_err(storage::io_err)?;
            let ts = k.get(at..at + 8).and_then(|b| b.try_into().ok()).map(Ts::from_be_bytes);
            Ok((ts.ok_or_else(|| std::io::Error::other("a short change key"))?, (k.len() + v.len()) as u64))
        },
    )
}

/// Where to trim `group`'s change log so that it keeps the changes after
/// `older_than` and at most `keep` bytes (of `total`), never past
/// `resolved` (a change may still land above it, and must not be counted
/// away): `(through, bytes dropped)`, or `None` when nothing need go. All
/// the changes of one timestamp go together.
pub fn trim_point(
    db: &Db,
    group: u64,
    total: u64,
    older_than: Ts,
    keep: u64,
    resolved: Ts,
) -> std::io::Result<Option<(Ts, u64)>> {
    let mut point: Option<(Ts, u64)> = None;
    let mut dropped = 0u64;
    for e in entries(db, group) {
        let (ts, bytes) = e?;
        if ts > resolved {
            break;
        }
        let enough = ts > older_than && total.saturating_sub(dropped) <= keep;
        // Stop only between timestamps: the changes at one go together.
        if enough && point.is_none_or(|(p, _)| p != ts) {
            break;
        }
        dropped += bytes;
        point = Some((ts, dropped));
    }
    Ok(point)
}

/// Deletes `group`'s changes at and below `through` into `batch`.
pub fn trim(db: &Db, batch: &mut rocksdb::WriteBatch, group: u64, through: Ts) {
    let cf = storage::cf(db, storage::CF_DATA);
    batch.delete_range_cf(cf, key_at(group, 0), key_at(group, through.saturating_add(1)));
}
