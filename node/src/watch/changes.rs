//! A shard's change log: one entry per change to a key, keyed by the
//! change's timestamp, kept beside the shard's data so that it is
//! replicated, snapshotted and moved with it.
//!
//! `kv::store` writes the entry in the same batch as the record it
//! describes, whenever a key's version changes (a put, a delete, a
//! transaction's write; a lock taken or released alone changes nothing a
//! watcher sees). The key is `(group, INTERNAL, 'c', ts, origin, user
//! key)`: read in key order it is in timestamp order, within one timestamp
//! by origin (the writes of one entry, or of one transaction: see
//! [`super::cursor`]), and within one origin in key order — exactly the
//! order a watch emits. A key changes at most once per timestamp and
//! origin (one entry writes a key once; a transaction writes each of its
//! keys once), so the triple is unique, and it is what a watch's cursor
//! names.
//!
//! (The first, unreleased build of the change log keyed entries by
//! `(ts, key)` under the tag `'C'`; the tag changed with the format, so
//! such entries are never misread, only left unread.)
//!
//! The log is trimmed by `ShardCommand::TrimChanges` (the leader proposes
//! it: see [`super::trim`]), which deletes every entry at or below a
//! timestamp and records it in the shard's [`ChangeLogState`]: a watch that
//! asks for changes after an older cursor is told the history is gone
//! (`compacted`), never given a silent gap.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::cursor::{Origin, Position};
use crate::clock::Ts;
use crate::kv::INTERNAL;
use crate::storage::{self, data_key, Db, ValueRecord};

const CHANGES: u8 = b'c';

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

/// A change as read back, with its timestamp, origin and key. Shared
/// ([`Arc`]) between the feed and every watch that emits it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub ts: Ts,
    pub origin: Origin,
    pub key: String,
    pub version: u64,
    pub value: Option<Vec<u8>>,
    pub prev: Option<(u64, Vec<u8>)>,
    /// Its line in a watch's stream, made once for all the watchers.
    #[serde(skip)]
    pub lines: Lines,
}

/// A change's stream lines, without and with its previous value, each
/// encoded by the first watcher that emits it.
#[derive(Clone, Default)]
pub struct Lines([OnceLock<Bytes>; 2]);

impl Lines {
    /// The line (`prev`: with the previous value), made by `make` once.
    pub fn get(&self, prev: bool, make: impl FnOnce() -> Bytes) -> Bytes {
        self.0[usize::from(prev)].get_or_init(make).clone()
    }
}

/// A cache: every two are alike.
impl PartialEq for Lines {
    fn eq(&self, _: &Lines) -> bool {
        true
    }
}

impl Eq for Lines {}

impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lines")
    }
}

impl Change {
    /// Its place in the order a watch emits changes in.
    pub fn order(&self) -> (Ts, Origin, &str) {
        (self.ts, self.origin, &self.key)
    }

    /// Bytes it holds, its stream lines counted in (what windows and
    /// buffers are bounded by): the key and values twice, once as read
    /// and once in the lines made of them.
    pub fn size(&self) -> usize {
        let payload =
            self.key.len() + self.value.as_ref().map_or(0, Vec::len) + self.prev.as_ref().map_or(0, |p| p.1.len());
        160 + 2 * payload
    }
}

/// The start of the change log's keys at timestamp `ts` (all keys).
pub fn key_at(group: u64, ts: Ts) -> Vec<u8> {
    let mut k = vec![INTERNAL, CHANGES];
    k.extend_from_slice(&ts.to_be_bytes());
    data_key(group, &k)
}

/// The key of the change of user key `key` at `ts` from `origin`.
pub fn change_key(group: u64, ts: Ts, origin: Origin, key: &str) -> Vec<u8> {
    let mut k = key_at(group, ts);
    k.extend_from_slice(&origin.to_be_bytes());
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
    /// Changes strictly after this position.
    pub after: &'a Position,
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

/// Reads `group`'s changes in `w`, in `(ts, origin, key)` order, as of `snap` (or
/// the database now). Answers whether it stopped at the limit.
pub fn read(
    db: &Db,
    snap: Option<&crate::kv::Snapshot<'_>>,
    group: u64,
    w: &Window<'_>,
) -> std::io::Result<(Vec<Arc<Change>>, bool)> {
    let (mut out, mut bytes) = (Vec::new(), 0);
    if w.after.ts >= w.through && w.after.at.is_none() {
        return Ok((out, false));
    }
    let from = match &w.after.at {
        None => key_at(group, w.after.ts.saturating_add(1)),
        Some((origin, k)) => {
            let mut from = change_key(group, w.after.ts, *origin, k);
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
        let (ts, origin, key) = parse_key(&k[prefix_len - 8..])?;
        if !crate::kv::within(key, w.start, w.end) {
            continue;
        }
        let c: StoredChange = crate::codec::decode(&v)?;
        let (version, value, prev) = (c.version, c.value, c.prev);
        let change = Change { ts, origin, key: key.to_string(), version, value, prev, lines: Lines::default() };
        bytes += change.size();
        out.push(Arc::new(change));
        if out.len() >= w.limit || bytes >= w.bytes {
            return Ok((out, true));
        }
    }
    Ok((out, false))
}

/// `(ts, origin, user key)` of a change key, from its timestamp on.
fn parse_key(rest: &[u8]) -> std::io::Result<(Ts, Origin, &str)> {
    let short = || std::io::Error::other("a short change key");
    let ts = Ts::from_be_bytes(rest.get(..8).ok_or_else(short)?.try_into().map_err(|_| short())?);
    let origin = Origin::from_be_bytes(rest.get(8..24).ok_or_else(short)?.try_into().map_err(|_| short())?);
    let key = std::str::from_utf8(&rest[24..]).map_err(|_| std::io::Error::other("a change key is not UTF-8"))?;
    Ok((ts, origin, key))
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
