//! The key-value logic of a shard's state machine: ownership (fencing),
//! versions, compare-and-set, tombstones, and the split hooks — writes to a
//! range being captured are also appended to a forward log, and writes to a
//! frozen range are refused.
//!
//! [`ShardState`] is the part of a shard's state that is not user data: the
//! ranges it owns and their epochs, running captures (as split source),
//! the incoming range (as split target), and ranges it handed away. It is
//! replicated (it changes only through applied entries or snapshots) and kept
//! in memory for fast checks.

use std::collections::{BTreeMap, HashMap};

use cleave_metadata::{OpId, RangeDescriptor, ShardId};
use serde::{Deserialize, Serialize};

use crate::clock::Ts;
use crate::command::{KvCommand, KvError, KvOp};
use crate::split::digest;
use crate::storage::{self, data_key, Db, ValueRecord};

/// A range this shard (the split source) is copying to `target`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    pub op_id: OpId,
    pub start: String,
    pub end: Option<String>,
    pub target: ShardId,
    /// Log index of the `Freeze`: from then on writes to the range are refused.
    pub frozen_at: Option<u64>,
    /// The `Freeze`'s timestamp: every change of the range here is at or
    /// below it (`watch`).
    #[serde(default)]
    pub frozen_ts: crate::clock::Ts,
    /// Wrapping sum of the digest changes of every write applied to the
    /// range since the capture began, kept by apply from the stored records
    /// (not from the forward log). With the range's digest at the backfill
    /// snapshot it gives the digest of the data the source really holds,
    /// which the target's must match at the freeze.
    #[serde(default)]
    pub changes: u64,
    /// Every target replica sits beside a replica of this shard: writes to
    /// the range are repeated under the target's keys on each node
    /// (`split::mirror`) instead of going to the forward log.
    #[serde(default)]
    pub mirror: bool,
    /// A freeze was refused for open write locks in the range: no new write
    /// lock is taken there (`RangeMoving`), so the ones open drain and the
    /// next freeze gets through however busy the range's transactions.
    #[serde(default)]
    pub freezing: bool,
}

impl Capture {
    /// A capture of `[start, end)` into `target` that has just begun.
    pub fn new(op_id: OpId, start: String, end: Option<String>, target: ShardId, mirror: bool) -> Capture {
        Capture { op_id, start, end, target, frozen_at: None, frozen_ts: 0, changes: 0, mirror, freezing: false }
    }

    pub fn covers(&self, key: &str) -> bool {
        within(key, &self.start, self.end.as_deref())
    }

    /// Whether this capture and `[start, end)` share a key.
    pub fn overlaps(&self, start: &str, end: Option<&str>) -> bool {
        spans_overlap(&self.start, self.end.as_deref(), start, end)
    }
}

/// A range this shard (the split target) is receiving; not served until activated.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    pub op_id: OpId,
    pub start: String,
    pub end: Option<String>,
    /// Highest source log index of forwarded writes applied here.
    pub watermark: u64,
    /// Content digest of the received records.
    pub digest: u64,
    /// Set once the backfill finished: the source's snapshot index and its digest.
    pub backfill: Option<(u64, u64)>,
    /// Keys and bytes the backfill copied (for progress reports).
    #[serde(default)]
    pub backfill_copied: (u64, u64),
    /// The source's digest of the range when its capture began (the backfill
    /// snapshot's digest less the capture's changes up to that snapshot).
    #[serde(default)]
    pub capture_base: u64,
    /// Live keys and bytes received so far (the backfill's and every
    /// forwarded record's): what the source gives away, read under the same
    /// lock as the watermark, so the two always agree.
    #[serde(default)]
    pub live: (u64, u64),
    /// Filled on each node from its replica of this source shard
    /// (`split::mirror`), not through this shard's log.
    #[serde(default)]
    pub mirror_of: Option<ShardId>,
    /// The split's source: where the range's changes before the target's
    /// activation are (`watch`; [`Born`]).
    #[serde(default)]
    pub source: Option<ShardId>,
}

impl Incoming {
    /// A split target's state when it is created: receiving `[start, end)`
    /// for operation `op_id`, nothing received yet.
    pub fn new(op_id: OpId, start: String, end: Option<String>) -> Incoming {
        Incoming {
            op_id,
            start,
            end,
            watermark: 0,
            digest: 0,
            backfill: None,
            backfill_copied: (0, 0),
            capture_base: 0,
            live: (0, 0),
            mirror_of: None,
            source: None,
        }
    }

    /// Counts a change of the received live keys and bytes.
    pub fn add_live(&mut self, d: StatsDelta) {
        self.live.0 = (self.live.0 as i64 + d.keys).max(0) as u64;
        self.live.1 = (self.live.1 as i64 + d.bytes).max(0) as u64;
    }
}

/// What a split target had received when it was activated: the figures its
/// source lowers its own counts by. Kept after activation, since the
/// target takes writes from then on and its own counts move on, while a
/// cutover cut short (the source's step failed, the driver died) needs them
/// again.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub op_id: OpId,
    pub keys: u64,
    pub bytes: u64,
}

/// The ranges a shard owns, and its split bookkeeping.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ShardState {
    pub ranges: Vec<RangeDescriptor>,
    #[serde(default)]
    pub captures: Vec<Capture>,
    #[serde(default)]
    pub incoming: Option<Incoming>,
    /// Ranges this shard gave away, with their new owners (for 421 answers).
    #[serde(default)]
    pub moved: Vec<RangeDescriptor>,
    /// Operations whose capture ended here (aborted or committed), newest
    /// [`ENDED_KEPT`]; a late `BeginCapture` of one of them is refused.
    #[serde(default)]
    pub ended_ops: Vec<OpId>,
    /// Every operation at or below this id has ended here (older entries of
    /// `ended_ops` are folded into it). The directory runs one operation per
    /// shard at a time and allocates ids in order, so the floor loses nothing.
    #[serde(default)]
    pub ended_below: OpId,
    /// The log index of the entry that recorded this shard's backfill as
    /// files (`split::sst`): a replica added later must not replay it (its
    /// files were staged only at the replicas of that time), so before a
    /// learner is added the leader's log is purged past it.
    #[serde(default)]
    pub files_at: Option<u64>,
    /// Set when this shard was activated as a split's target (boxed: the
    /// state travels inside node requests, kept small).
    #[serde(default)]
    pub received: Option<Box<Received>>,
    /// The timestamp of the latest entry applied (`watch`): each entry
    /// takes a later one ([`ShardState::next_ts`]).
    #[serde(default)]
    pub last_ts: Ts,
    /// Write locks transactions hold here, by key, with the timestamp of
    /// the entry that took each: the transaction's writes will land above
    /// it, though maybe below `last_ts` (see [`ShardState::resolved`]).
    #[serde(default)]
    pub open_locks: BTreeMap<String, Ts>,
    /// Where the changes before this shard took its range are (a split's
    /// target; see `watch`). Boxed, like `received`.
    #[serde(default)]
    pub born: Option<Box<Born>>,
    /// What this shard's change log holds (`watch::changes`).
    #[serde(default)]
    pub change_log: crate::watch::changes::ChangeLogState,
    /// Ranges this shard took by merges whose earlier changes are not in
    /// its change log (`watch`), until the log is trimmed past them.
    #[serde(default)]
    pub absorbed: Vec<Absorbed>,
}

/// A merged-in range's lineage: its changes at or below `since` (the
/// merge source's freeze) are in shard `from`'s change log (kept a while
/// after the merge for the watches that are behind it; `watch::plan`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Absorbed {
    pub start: String,
    pub end: Option<String>,
    pub since: Ts,
    #[serde(default)]
    pub from: ShardId,
}

/// A split's target's lineage: the changes of `[start, end)` at or below
/// `ts` are in shard `from`'s change log (this shard's start after `ts`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Born {
    pub from: ShardId,
    pub start: String,
    pub end: Option<String>,
    pub ts: Ts,
}

/// How many ended operations a shard remembers one by one.
pub const ENDED_KEPT: usize = 64;

/// Whether `key` lies in `[start, end)` (`None`: to the end of the key space).
pub fn within(key: &str, start: &str, end: Option<&str>) -> bool {
    key >= start && end.is_none_or(|e| key < e)
}

/// Whether `[start, end)` lies within `[rs, re)` (`None`: to the end of
/// the key space).
pub fn span_within(start: &str, end: Option<&str>, rs: &str, re: Option<&str>) -> bool {
    start >= rs
        && match (end, re) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(e), Some(r)) => e <= r,
        }
}

/// Whether `[a, ae)` and `[b, be)` share a key.
pub fn spans_overlap(a: &str, ae: Option<&str>, b: &str, be: Option<&str>) -> bool {
    ae.is_none_or(|e| b < e) && be.is_none_or(|e| a < e)
}

impl ShardState {
    /// The owned range containing `key`.
    pub fn owner(&self, key: &str) -> Option<&RangeDescriptor> {
        self.ranges.iter().find(|r| r.contains(key))
    }

    /// Whether one owned range holds all of `[start, end)` (`end = None`: to
    /// the end of the key space).
    pub fn owns(&self, start: &str, end: Option<&str>) -> bool {
        self.owner(start).is_some_and(|r| match (&r.end, end) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(re), Some(e)) => e <= re.as_str(),
        })
    }

    /// The timestamp of the entry being applied, given its stamp (the
    /// proposer's clock): later than every earlier entry's.
    pub fn next_ts(&mut self, stamp: Ts) -> Ts {
        self.last_ts = stamp.max(self.last_ts.saturating_add(1));
        self.last_ts
    }

    /// No change at or below this timestamp will ever be made here: the
    /// last one, held below the oldest open write lock (its transaction
    /// commits above the lock's timestamp, maybe below `last_ts`).
    pub fn resolved(&self) -> Ts {
        let below_locks = self.open_locks.values().min().map_or(Ts::MAX, |t| t.saturating_sub(1));
        self.last_ts.min(below_locks)
    }

    /// Whether operation `op`'s capture has ended on this shard.
    pub fn has_ended(&self, op: OpId) -> bool {
        op <= self.ended_below || self.ended_ops.binary_search(&op).is_ok()
    }

    /// Records that operation `op`'s capture ended (idempotent).
    pub fn end_op(&mut self, op: OpId) {
        if let Err(at) = self.ended_ops.binary_search(&op) {
            if op > self.ended_below {
                self.ended_ops.insert(at, op);
            }
        }
        while self.ended_ops.len() > ENDED_KEPT {
            let oldest = self.ended_ops.remove(0);
            self.ended_below = self.ended_below.max(oldest);
        }
    }

    /// What a stale route is told: our ranges and those we handed away.
    pub fn wrong_range(&self) -> KvError {
        KvError::WrongRange { ranges: self.ranges.iter().chain(self.moved.iter()).cloned().collect() }
    }

    /// Checks that `key` is owned here through range `range_id` at `epoch`.
    pub fn check_route(&self, key: &str, range_id: u64, epoch: u64) -> Result<&RangeDescriptor, KvError> {
        if let Some(inc) = &self.incoming {
            if within(key, &inc.start, inc.end.as_deref()) {
                return Err(KvError::RangeMoving);
            }
        }
        match self.owner(key) {
            Some(r) if r.range_id == range_id && r.epoch == epoch => Ok(r),
            _ => Err(self.wrong_range()),
        }
    }
}

/// Change in a shard's live keys and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsDelta {
    pub keys: i64,
    pub bytes: i64,
}

impl StatsDelta {
    /// The contribution of replacing `old` by `new` under `key`.
    pub fn replace(key: &str, old: Option<&ValueRecord>, new: &ValueRecord) -> StatsDelta {
        let size = |r: &ValueRecord| if r.tombstone { 0 } else { (key.len() + r.json.len()) as i64 };
        let live = |r: &ValueRecord| i64::from(!r.tombstone);
        StatsDelta { keys: live(new) - old.map_or(0, live), bytes: size(new) - old.map_or(0, size) }
    }

    pub fn add(&mut self, o: StatsDelta) {
        self.keys += o.keys;
        self.bytes += o.bytes;
    }
}

/// Reserved first byte of internal keys under a shard's data prefix. It
/// cannot start a UTF-8 string, so it never collides with a user key, and it
/// sorts after all of them.
pub(crate) const INTERNAL: u8 = 0xff;
const FORWARD: u8 = b'F';
const BACKFILL: u8 = b'B';

/// Exclusive upper bound of the user keys of `group`.
pub fn user_data_end(group: u64) -> Vec<u8> {
    data_key(group, &[INTERNAL])
}

/// Key of forward-log entry `index` of operation `op`.
pub fn forward_key(group: u64, op: OpId, index: u64) -> Vec<u8> {
    let mut k = vec![INTERNAL, FORWARD];
    k.extend_from_slice(&op.to_be_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    data_key(group, &k)
}

/// Key of the marker a split's backfill files carry (`split::sst`): its
/// value names the attempt whose files were ingested into `group`.
pub fn backfill_marker_key(group: u64, op: OpId) -> Vec<u8> {
    let mut k = vec![INTERNAL, BACKFILL];
    k.extend_from_slice(&op.to_be_bytes());
    data_key(group, &k)
}

/// The writes one log entry made to a captured range, kept for the split
/// target (a transaction step writes several keys in one entry). Part of
/// the shard's data, so it survives leader changes and travels in snapshots.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct ForwardEntry {
    pub records: Vec<ForwardRecord>,
}

/// One key's new record in a [`ForwardEntry`].
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ForwardRecord {
    pub key: String,
    /// The new stored record (encoded [`ValueRecord`]).
    pub record: Vec<u8>,
    /// Digest change this write made to the captured range (for
    /// diagnostics: verification uses `Capture::changes`, kept by apply
    /// from the stored records).
    pub delta: u64,
}

impl ForwardEntry {
    pub fn encode(&self) -> Vec<u8> {
        // Plain strings, byte vectors and integers: encoding cannot fail.
        crate::codec::encode(self).expect("forward entry encodes")
    }
}

/// Reads the stored record of `key` in `group`.
pub fn read(db: &Db, group: u64, key: &str) -> std::io::Result<Option<ValueRecord>> {
    let cf = storage::cf(db, storage::CF_DATA);
    let stored = db.get_pinned_cf(cf, data_key(group, key.as_bytes())).map_err(storage::io_err)?;
    stored.map(|v| storage::decode_record(key.as_bytes(), &v)).transpose()
}

/// Records written earlier in the same apply batch, which RocksDB cannot
/// see yet; consulted before the database.
pub type Overlay = HashMap<String, ValueRecord>;

/// What one apply call accumulates before its single atomic write.
#[derive(Default)]
pub struct ApplyBatch {
    pub write: rocksdb::WriteBatch,
    pub overlay: Overlay,
    pub stats: StatsDelta,
    /// The state-machine state changed and must be persisted with the batch.
    pub changed: bool,
    /// The forward-log entries written in this batch, by (operation, index).
    pub forwarded: HashMap<(OpId, u64), ForwardEntry>,
    /// Writes to mirrored ranges, repeated under their targets' keys as the
    /// batch is written (`split::mirror::Mirrors::write_with`).
    pub mirrored: Vec<crate::split::mirror::MirrorWrite>,
    /// A mirrored split target's figures on this node, by operation, found
    /// before its `Activate` is applied (`GroupSm::mirror_before`).
    pub mirror_figures: HashMap<OpId, crate::split::mirror::Figures>,
    /// The timestamp of the changes the entry being applied makes (set by
    /// the state machine per entry: [`ShardState::next_ts`], or a
    /// transaction's commit timestamp).
    pub ts: Ts,
    /// The entry's stamp as proposed (0: unstamped): a transaction's
    /// `Commit` is stamped with its commit timestamp, and writes at it.
    pub stamp: Ts,
    /// Whose writes the entry's changes are (set with `ts`: the entry's,
    /// or a transaction's; see [`crate::watch::cursor`]).
    pub origin: crate::watch::cursor::Origin,
}

/// The current record of `key`: from this batch, else from the database.
pub fn current(db: &Db, group: u64, overlay: &Overlay, key: &str) -> std::io::Result<Option<ValueRecord>> {
    match overlay.get(key) {
        Some(r) => Ok(Some(r.clone())),
        None => read(db, group, key),
    }
}

/// What applying a command yields: the outer error is a storage failure,
/// which must stop the replica (it is never an answer: the other replicas
/// would apply the entry); the inner one is a deterministic refusal.
pub type Applied<T, E> = std::io::Result<Result<T, E>>;

/// Refuses a write of `key` routed through range `range_id` at `epoch`:
/// the shard does not own the key at that epoch, or the key's range is
/// frozen for a cutover (by any capture covering it).
pub fn check_writable(state: &ShardState, key: &str, range_id: u64, epoch: u64) -> Result<(), KvError> {
    state.check_route(key, range_id, epoch)?;
    if state.captures.iter().any(|c| c.covers(key) && c.frozen_at.is_some()) {
        return Err(KvError::RangeMoving);
    }
    Ok(())
}

/// Writes `record` as `key`'s new record (replacing `current`) into the
/// batch of the entry at log `index`: also appended to the forward log of
/// every capture covering the key, to the change log when the key's
/// version changes (at `b.ts`), to the open write locks when one is taken
/// or released, counted in the stats and the overlay.
/// The one way a record is written by apply; callers check
/// [`check_writable`] first.
#[allow(clippy::too_many_arguments)]
pub fn store(
    db: &Db,
    group: u64,
    index: u64,
    state: &mut ShardState,
    b: &mut ApplyBatch,
    key: &str,
    current: Option<&ValueRecord>,
    record: ValueRecord,
) {
    let encoded = record.encode();
    let delta = digest::delta(key, current, &record);
    for c in state.captures.iter_mut().filter(|c| c.covers(key)) {
        if c.mirror {
            b.mirrored.push(crate::split::mirror::MirrorWrite {
                target: c.target,
                key: key.to_string(),
                record: record.clone(),
                encoded: encoded.clone(),
                live: StatsDelta::replace(key, current, &record),
                digest: delta,
            });
        } else {
            // Every write of this entry to the range goes in its one forward
            // entry, written once the entry is applied ([`flush_forwarded`]).
            let entry = b.forwarded.entry((c.op_id, index)).or_default();
            entry.records.push(ForwardRecord { key: key.to_string(), record: encoded.clone(), delta });
        }
        c.changes = c.changes.wrapping_add(delta);
        b.changed = true;
    }
    write_record(db, &mut b.write, group, key, &record, &encoded);
    if let Some(change) = crate::watch::changes::change_of(current, &record) {
        let (k, v) = (crate::watch::changes::change_key(group, b.ts, b.origin, key), change.encode());
        state.change_log.bytes += (k.len() + v.len()) as u64;
        b.write.put_cf(storage::cf(db, storage::CF_DATA), k, v);
        b.changed = true;
    }
    let write_lock = |r: Option<&ValueRecord>| r.and_then(ValueRecord::lock).is_some_and(|l| l.write);
    match (write_lock(current), write_lock(Some(&record))) {
        (false, true) => {
            state.open_locks.insert(key.to_string(), b.ts);
            b.changed = true;
        }
        (true, false) => {
            state.open_locks.remove(key);
            b.changed = true;
        }
        _ => {}
    }
    b.stats.add(StatsDelta::replace(key, current, &record));
    b.overlay.insert(key.to_string(), record);
}

/// Puts `record` (`encoded`) as `key`'s stored record in `batch` — or, for a
/// vacant record ([`ValueRecord::is_vacant`]), deletes the key: what says no
/// more than absence is not stored.
pub fn write_record(
    db: &Db,
    batch: &mut rocksdb::WriteBatch,
    group: u64,
    key: &str,
    record: &ValueRecord,
    encoded: &[u8],
) {
    let cf = storage::cf(db, storage::CF_DATA);
    if record.is_vacant() {
        batch.delete_cf(cf, data_key(group, key.as_bytes()));
    } else {
        batch.put_cf(cf, data_key(group, key.as_bytes()), encoded);
    }
}

/// Writes the forward entries the command just applied gathered (see
/// [`store`]) into the batch: once each, before any later command of the
/// batch (which may drop the forward log) is applied.
pub fn flush_forwarded(db: &Db, group: u64, b: &mut ApplyBatch) {
    let cf = storage::cf(db, storage::CF_DATA);
    for ((op, index), entry) in b.forwarded.drain() {
        b.write.put_cf(cf, forward_key(group, op, index), entry.encode());
    }
}

/// Applies one KV command at log `index` into `batch`. Returns the key's new
/// version. A write to a captured range is also appended to the forward log
/// of *every* capture covering the key, and refused if any of them is frozen.
/// A key locked by a transaction refuses the write (the router settles the
/// lock and retries); outcomes a primary key keeps survive the write.
pub fn apply(
    db: &Db,
    group: u64,
    index: u64,
    state: &mut ShardState,
    b: &mut ApplyBatch,
    cmd: &KvCommand,
) -> Applied<u64, KvError> {
    let key = cmd.key();
    if let Err(e) = check_writable(state, key, cmd.range_id, cmd.epoch) {
        return Ok(Err(e));
    }
    let current = current(db, group, &b.overlay, key)?;
    if let Some(lock) = current.as_ref().and_then(ValueRecord::lock) {
        return Ok(Err(KvError::Locked { key: key.to_string(), lock: lock.clone() }));
    }
    let live = ValueRecord::live_version(current.as_ref());
    let last = current.as_ref().map_or(0, |r| r.version);
    let (if_version, record) = match &cmd.op {
        KvOp::Put { value, if_version, .. } => (*if_version, ValueRecord::live(last + 1, value.as_bytes().to_vec())),
        KvOp::Delete { if_version, .. } => {
            if live == 0 {
                return Ok(Err(if if_version.is_some_and(|v| v != 0) {
                    KvError::VersionConflict { current: 0 }
                } else {
                    KvError::NotFound
                }));
            }
            (*if_version, ValueRecord::deleted(last + 1))
        }
    };
    if let Some(expected) = if_version {
        if expected != live {
            return Ok(Err(KvError::VersionConflict { current: live }));
        }
    }
    let record = ValueRecord { txn: current.as_ref().and_then(|c| c.txn.clone()), ..record };
    let version = record.version;
    store(db, group, index, state, b, key, current.as_ref(), record);
    flush_forwarded(db, group, b);
    Ok(Ok(version))
}

/// A consistent read view of the node's database.
pub type Snapshot<'a> = rocksdb::SnapshotWithThreadMode<'a, Db>;

/// Reads the stored record of `key` in `group` as of `snap`.
pub fn read_at(db: &Db, snap: &Snapshot<'_>, group: u64, key: &str) -> std::io::Result<Option<ValueRecord>> {
    let cf = storage::cf(db, storage::CF_DATA);
    let stored = snap.get_pinned_cf(cf, data_key(group, key.as_bytes())).map_err(storage::io_err)?;
    stored.map(|v| storage::decode_record(key.as_bytes(), &v)).transpose()
}

/// One live item returned by a scan.
pub struct ScannedItem {
    pub key: String,
    pub record: ValueRecord,
}

/// Iterates the stored records of `group` in `[start, end)` (user keys only).
pub(crate) fn records<'a>(
    db: &'a Db,
    snap: Option<&Snapshot<'_>>,
    group: u64,
    start: &str,
    end: Option<&str>,
) -> rocksdb::DBIteratorWithThreadMode<'a, Db> {
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(match end {
        Some(e) => data_key(group, e.as_bytes()),
        None => user_data_end(group),
    });
    if let Some(snap) = snap {
        opts.set_snapshot(snap);
    }
    let from = data_key(group, start.as_bytes());
    db.iterator_cf_opt(
        storage::cf(db, storage::CF_DATA),
        opts,
        rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
    )
}

/// Live items of `group` in `[start, end)` as of `snap`, at most `limit`,
/// and, not counted against the limit, deleted or absent keys a
/// transaction holds for writing (its commit may be creating them: the
/// caller settles their locks before it answers, then drops tombstones).
pub fn scan_at(
    db: &Db,
    snap: &Snapshot<'_>,
    group: u64,
    start: &str,
    end: Option<&str>,
    limit: usize,
) -> std::io::Result<Vec<ScannedItem>> {
    let mut out = Vec::new();
    let mut live = 0;
    for item in records(db, Some(snap), group, start, end) {
        let (k, v) = item.map_err(storage::io_err)?;
        let record = storage::decode_record(storage::user_key_of(&k), &v)?;
        if record.tombstone && !record.lock().is_some_and(|l| l.write) {
            continue;
        }
        live += usize::from(!record.tombstone);
        let key = String::from_utf8_lossy(storage::user_key_of(&k)).into_owned();
        out.push(ScannedItem { key, record });
        if live >= limit {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_keys_sort_after_every_user_key_and_by_index() {
        let g = 7;
        let top_user_key = data_key(g, "\u{10ffff}\u{10ffff}".as_bytes());
        assert!(top_user_key < user_data_end(g));
        assert!(user_data_end(g) <= forward_key(g, 1, 0));
        assert!(forward_key(g, 1, 9) < forward_key(g, 1, 10));
        assert!(forward_key(g, 1, u64::MAX) < forward_key(g, 2, 0));
        assert!(forward_key(g, u64::MAX, u64::MAX) < storage::group_range_end(g));
    }

    #[test]
    fn spans_within_and_overlapping() {
        assert!(span_within("b", Some("c"), "a", None));
        assert!(span_within("b", None, "a", None));
        assert!(!span_within("b", None, "a", Some("z")));
        assert!(span_within("b", Some("z"), "b", Some("z")));
        assert!(!span_within("a", Some("c"), "b", Some("z")));
        assert!(spans_overlap("a", Some("c"), "b", None));
        assert!(!spans_overlap("a", Some("b"), "b", None));
        assert!(spans_overlap("a", None, "x", Some("y")));
    }

    #[test]
    fn stats_follow_puts_and_deletes() {
        let v = |json: &str| ValueRecord::live(1, json.as_bytes().to_vec());
        let t = ValueRecord::deleted(2);
        assert_eq!(StatsDelta::replace("ab", None, &v("123")), StatsDelta { keys: 1, bytes: 5 });
        assert_eq!(StatsDelta::replace("ab", Some(&v("123")), &v("1")), StatsDelta { keys: 0, bytes: -2 });
        assert_eq!(StatsDelta::replace("ab", Some(&v("1")), &t), StatsDelta { keys: -1, bytes: -3 });
        assert_eq!(StatsDelta::replace("ab", Some(&t), &v("1")), StatsDelta { keys: 1, bytes: 3 });
    }

    #[test]
    fn frozen_and_incoming_ranges_refuse_routes() {
        let r = RangeDescriptor {
            range_id: 1,
            start: String::new(),
            end: None,
            shard_id: 1,
            epoch: 1,
            state: Default::default(),
        };
        let mut s = ShardState { ranges: vec![r], ..Default::default() };
        assert!(s.check_route("k", 1, 1).is_ok());
        assert!(matches!(s.check_route("k", 1, 2), Err(KvError::WrongRange { .. })));
        s.incoming = Some(Incoming::new(1, "j".into(), None));
        assert_eq!(s.check_route("k", 1, 1), Err(KvError::RangeMoving));
        assert!(s.check_route("a", 1, 1).is_ok());
    }
}
