//! Split by mirror: when every replica of the new shard B sits on a node
//! that also holds a replica of the source A (what a split's placement
//! gives on its own), each node builds its B replica from its own A
//! replica, and no byte of the range crosses the network or B's Raft log.
//!
//! Two parts fill B's keys on a node, and both read A's data *as it is now*
//! (never a snapshot of the past), which is what makes them safe together:
//!
//! - **The copy** walks `[start, end)` of A in key order, a chunk at a time
//!   ([`CHUNK_BYTES`]), writes each chunk under B's keys into a table file
//!   and ingests it (no WAL, no memtable, no compaction: the file lands at
//!   the bottom). Everything below the copy's *cursor* is B's already.
//! - **The mirror**: every write A's apply makes to the range is repeated
//!   under B's keys in the same atomic batch ([`Mirrors::write_with`]) when
//!   the key is below the cursor. Above it, the copy will read the new value
//!   when it gets there — unless the chunk being copied was already read: a
//!   write to the chunk while it is in flight is remembered (`touched`), and
//!   the copy reads those keys again from A, under the lock, before it moves
//!   the cursor past them.
//!
//! So after A applied index `i` and the copy is done, B's keys on that node
//! hold exactly A's range at `i`, and once A applied the `Freeze`, at the
//! freeze: every replica of B then holds the same data, with no consensus
//! of its own. B's `Activate` waits (before it is applied) until that is so
//! on the node; A's `SplitDone`, which drops the range, waits until the copy
//! is done, so it never deletes what a B replica beside it still needs.
//!
//! Crashes: the copy's progress is not kept; a node that restarts before
//! its copy finished deletes B's keys and copies again (reading A as it is
//! then). A finished copy is recorded ([`tag::MIRROR`], with B's live keys,
//! bytes and digest) in the batch that moves the cursor to the end, with the
//! WAL synced, and from then on every mirrored batch keeps the record
//! current. A snapshot installed into A replaces its data wholesale, so it
//! resets the node's copies of A that it can make stale — not one claimed
//! for activation, nor a finished one of a range already frozen there
//! ([`Mirrors::reset_source`]); one installed into B takes B out of
//! mirroring ([`Mirrors::target_installing`]).
//!
//! A split whose B replicas are not all beside A replicas uses the shipped
//! backfill and forward log instead (`forwarder`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cleave_metadata::{OpId, ShardId};
use serde::{Deserialize, Serialize};

use crate::kv::{self, StatsDelta};
use crate::raft::SmState;
use crate::split::digest;
use crate::storage::{self, data_key, state_key, tag, Db, ValueRecord};

/// User bytes per copied chunk (one table file each).
pub const CHUNK_BYTES: u64 = 16 << 20;
/// Chunks of the unit tests: a few dozen records each.
const TEST_CHUNK_BYTES: u64 = 1024;

/// One mirrored range: operation `op` copies `[start, end)` of `source`
/// into `target`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MirrorSpec {
    pub source: ShardId,
    pub target: ShardId,
    pub op: OpId,
    pub start: String,
    pub end: Option<String>,
}

impl MirrorSpec {
    /// The mirror of `source`'s capture `c`.
    pub fn of_capture(source: ShardId, c: &kv::Capture) -> MirrorSpec {
        MirrorSpec { source, target: c.target, op: c.op_id, start: c.start.clone(), end: c.end.clone() }
    }

    /// The mirror filling `target`'s incoming range, if it is filled beside its source.
    pub fn of_incoming(target: ShardId, i: &kv::Incoming) -> Option<MirrorSpec> {
        let source = i.mirror_of?;
        Some(MirrorSpec { source, target, op: i.op_id, start: i.start.clone(), end: i.end.clone() })
    }

    fn covers(&self, key: &str) -> bool {
        key >= self.start.as_str() && self.end.as_deref().is_none_or(|e| key < e)
    }
}

/// What B's keys hold on this node: live keys and bytes, the content digest
/// (`split::digest`), and the bytes the copy read.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    pub keys: u64,
    pub bytes: u64,
    pub digest: u64,
    pub copied: u64,
}

impl Figures {
    fn replace(&mut self, key: &str, old: Option<&ValueRecord>, new: &ValueRecord) {
        self.add(StatsDelta::replace(key, old, new), digest::delta(key, old, new));
    }

    fn add(&mut self, d: StatsDelta, digest: u64) {
        self.keys = (self.keys as i64 + d.keys).max(0) as u64;
        self.bytes = (self.bytes as i64 + d.bytes).max(0) as u64;
        self.digest = self.digest.wrapping_add(digest);
    }
}

/// The finished copy's record (`tag::MIRROR` of the target).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct Record {
    spec: MirrorSpec,
    figures: Figures,
}

/// A node's view of one mirror, for the split's driver.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct MirrorReport {
    pub done: bool,
    pub figures: Figures,
    /// The source's freeze index as applied on that node (`u64::MAX` once
    /// the source dropped the range there: it had everything before).
    pub frozen_at: Option<u64>,
    /// Names this copy: a copy that starts over (a restart, a reset) has a
    /// new one, and its progress counts from zero again.
    pub attempt: u64,
    /// The source's applied index on that node.
    pub applied: u64,
}

/// A write A's apply made to a mirrored range, to repeat under B's keys:
/// the record, and its change of the live figures (B's old record below the
/// cursor is A's old record: the two are kept equal there).
pub struct MirrorWrite {
    pub target: ShardId,
    pub key: String,
    pub record: ValueRecord,
    pub encoded: Vec<u8>,
    pub live: StatsDelta,
    pub digest: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Cursor {
    /// Every key below this one is copied and kept current.
    At(String),
    Done,
}

struct Progress {
    cursor: Cursor,
    /// Taken for the target's activation ([`Mirrors::claim`]): nothing
    /// resets the copy any more.
    claimed: bool,
    /// The start of the chunk being copied, while one is.
    chunk: Option<String>,
    /// Keys at or after `chunk` that A wrote while the chunk was in flight.
    touched: BTreeSet<String>,
    figures: Figures,
    cancelled: bool,
}

impl Progress {
    fn below_cursor(&self, key: &str) -> bool {
        match &self.cursor {
            Cursor::Done => true,
            Cursor::At(c) => key < c.as_str(),
        }
    }
}

/// One mirror on this node.
pub struct Mirror {
    pub spec: MirrorSpec,
    /// A random name of this copy ([`MirrorReport::attempt`]).
    attempt: u64,
    progress: Mutex<Progress>,
    /// Held by the copy for a whole chunk; a cancel takes it, so no chunk
    /// is ingested into a replica being deleted.
    gate: Mutex<()>,
    done: tokio::sync::watch::Sender<bool>,
}

impl Mirror {
    fn new(spec: MirrorSpec, done: Option<Figures>) -> Arc<Mirror> {
        let cursor = if done.is_some() { Cursor::Done } else { Cursor::At(spec.start.clone()) };
        let progress = Progress {
            cursor,
            claimed: false,
            chunk: None,
            touched: BTreeSet::new(),
            figures: done.unwrap_or_default(),
            cancelled: false,
        };
        Arc::new(Mirror {
            spec,
            attempt: rand::random::<u64>() | 1,
            progress: Mutex::new(progress),
            gate: Mutex::new(()),
            done: tokio::sync::watch::channel(done.is_some()).0,
        })
    }

    pub fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    pub fn figures(&self) -> Figures {
        self.progress.lock().unwrap().figures
    }

    /// Waits until the copy is done.
    pub async fn wait_done(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    fn cancel(&self) {
        let _gate = self.gate.lock().unwrap();
        self.progress.lock().unwrap().cancelled = true;
    }
}

/// The mirrors of this node, by target shard.
#[derive(Default)]
pub struct Mirrors {
    inner: Mutex<Inner>,
    /// Most bytes per second a copy reads (0: no limit): the node's
    /// `--split-backfill-rate`.
    rate: u64,
}

#[derive(Default)]
struct Inner {
    by_target: HashMap<ShardId, Arc<Mirror>>,
    /// Targets whose replica here was deleted, or replaced by a snapshot of
    /// the target's own: never mirrored again (group ids are not reused).
    deleted: HashSet<ShardId>,
    /// Targets activated here (their `Activate` batch, which deletes the
    /// record, is written).
    activated: HashSet<ShardId>,
    /// Sources whose replica here is installing a snapshot: no copy reads
    /// them meanwhile.
    installing: HashSet<ShardId>,
    /// Failed copies per target; past [`MOST_FAILURES`] the target is not
    /// mirrored here any more (its replica stops at activation).
    failures: HashMap<ShardId, u32>,
}

/// Failed copies of one target before this node gives it up.
const MOST_FAILURES: u32 = 5;

impl Mirrors {
    /// Mirrors whose copies read at most `bytes_per_s` (0: no limit).
    pub fn with_rate(bytes_per_s: u64) -> Mirrors {
        Mirrors { rate: bytes_per_s, ..Default::default() }
    }

    /// The mirror into `target`, if one runs here.
    pub fn get(&self, target: ShardId) -> Option<Arc<Mirror>> {
        self.inner.lock().unwrap().by_target.get(&target).cloned()
    }

    /// The mirror of `spec` on this node, starting its copy if it has none
    /// yet — only while this node holds a replica of the target that still
    /// receives for the operation and the source's replica here mirrors it.
    /// `None`: nothing to mirror here (no such replica, or activated).
    pub fn ensure(self: &Arc<Self>, db: &Arc<Db>, root: &Path, spec: &MirrorSpec) -> io::Result<Option<Arc<Mirror>>> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(m) = inner.by_target.get(&spec.target) {
            return Ok((m.spec == *spec).then(|| m.clone()));
        }
        let t = spec.target;
        if inner.deleted.contains(&t) || inner.activated.contains(&t) || installing(&inner, db, spec.source)? {
            return Ok(None);
        }
        if inner.failures.get(&t).is_some_and(|n| *n >= MOST_FAILURES) {
            return Ok(None);
        }
        if let Some(r) = read_record(db, t)? {
            if r.spec != *spec {
                return Ok(None);
            }
            let m = Mirror::new(spec.clone(), Some(r.figures));
            inner.by_target.insert(t, m.clone());
            return Ok(Some(m));
        }
        // Only what the two replicas here agree on: the target receives
        // this range for this operation from this source, and the source
        // captures exactly this range for it, mirrored.
        let receiving = matches!(read_state(db, t)?, Some(SmState::Shard(s)) if s.incoming.as_ref().is_some_and(|i|
            i.op_id == spec.op && i.mirror_of == Some(spec.source) && i.start == spec.start && i.end == spec.end));
        if !receiving || !captured(db, spec)? {
            return Ok(None);
        }
        let m = Mirror::new(spec.clone(), None);
        inner.by_target.insert(spec.target, m.clone());
        let (db, dir, copy, mirrors) = (db.clone(), chunk_dir(root, spec.target), m.clone(), self.clone());
        drop(crate::background::run(move || {
            let mut limit = crate::split::sst::RateLimit::new(mirrors.rate);
            if let Err(e) = copy_range(&db, &dir, &copy, &mut limit) {
                // The copy starts over the next time the mirror is asked
                // for (a status poll, a step that waits for it).
                tracing::warn!(shard = copy.spec.target, op = copy.spec.op, "mirror copy failed: {e}");
                mirrors.drop_failed(&copy);
            }
        }));
        Ok(Some(m))
    }

    /// Waits until this node's copy of `spec` is done, starting it (again,
    /// after a failure or a reset) as needed; `None`: nothing to mirror
    /// here (see [`Mirrors::ensure`]).
    pub async fn wait_done(
        self: &Arc<Self>,
        db: &Arc<Db>,
        root: &Path,
        spec: &MirrorSpec,
    ) -> io::Result<Option<Arc<Mirror>>> {
        loop {
            let Some(m) = self.ensure(db, root, spec)? else {
                // A source being installed is a wait, not an answer.
                if installing(&self.inner.lock().unwrap(), db, spec.source)? {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
                return Ok(None);
            };
            if m.is_done() {
                return Ok(Some(m));
            }
            // Looked at again now and then: a failed copy is dropped, and
            // a snapshot into the source replaces the mirror.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), m.wait_done()).await;
        }
    }

    /// Takes the finished mirror `m` for its target's activation: from now
    /// on its keys are the target's own, and nothing resets them. False if
    /// `m` is no longer the target's mirror (a reset replaced it).
    pub fn claim(&self, m: &Arc<Mirror>) -> bool {
        let inner = self.inner.lock().unwrap();
        let current = inner.by_target.get(&m.spec.target).is_some_and(|x| Arc::ptr_eq(x, m));
        let mut p = m.progress.lock().unwrap();
        if current && m.is_done() && !p.cancelled {
            p.claimed = true;
            return true;
        }
        false
    }

    /// A failed copy's mirror is dropped, so the next [`Mirrors::ensure`]
    /// starts over (up to [`MOST_FAILURES`] times).
    fn drop_failed(&self, m: &Arc<Mirror>) {
        let mut inner = self.inner.lock().unwrap();
        if inner.by_target.get(&m.spec.target).is_some_and(|x| Arc::ptr_eq(x, m)) {
            inner.by_target.remove(&m.spec.target);
        }
        *inner.failures.entry(m.spec.target).or_default() += 1;
    }

    /// The target's `Activate` batch is written: its keys are its own.
    pub fn activated(&self, target: ShardId) {
        let mut inner = self.inner.lock().unwrap();
        inner.by_target.remove(&target);
        inner.failures.remove(&target);
        inner.activated.insert(target);
    }

    /// A replica here is being deleted: as a target, its copy stops first;
    /// as a source, every unfinished copy reading it stops, and its target
    /// is given up here (it stops at activation).
    pub fn forget(&self, group: ShardId) {
        let gone: Vec<Arc<Mirror>> = {
            let mut inner = self.inner.lock().unwrap();
            inner.deleted.insert(group);
            let mut gone: Vec<Arc<Mirror>> = inner.by_target.remove(&group).into_iter().collect();
            let reading: Vec<ShardId> = inner
                .by_target
                .iter()
                .filter(|(_, m)| m.spec.source == group && !m.is_done())
                .map(|(t, _)| *t)
                .collect();
            for t in reading {
                gone.extend(inner.by_target.remove(&t));
                inner.failures.insert(t, MOST_FAILURES);
            }
            gone
        };
        for m in gone {
            m.cancel();
        }
    }

    /// A snapshot is about to replace `source`'s data: every copy of it
    /// here that the snapshot may make stale is cancelled and its target's
    /// keys and record deleted, so that the next [`Mirrors::ensure`] copies
    /// afresh from the installed data. Kept: a copy claimed for its
    /// activation, and a finished one of an operation `keep` names (one
    /// whose capture here was frozen, or ended by `SplitDone`: the range
    /// cannot change after the freeze). Until [`Mirrors::installed`], no
    /// copy of `source` starts.
    pub fn reset_source(&self, db: &Db, source: ShardId, keep: impl Fn(OpId) -> bool) -> io::Result<()> {
        // All under the registry's lock, so that no `ensure` sees a half
        // reset (a record about to go, the source's old state).
        let mut inner = self.inner.lock().unwrap();
        inner.installing.insert(source);
        let targets: Vec<ShardId> =
            inner.by_target.iter().filter(|(_, m)| m.spec.source == source).map(|(t, _)| *t).collect();
        for t in targets {
            let m = inner.by_target[&t].clone();
            let keep = {
                let p = m.progress.lock().unwrap();
                p.claimed || (p.cursor == Cursor::Done && keep(m.spec.op))
            };
            if !keep {
                inner.by_target.remove(&t);
                m.cancel();
                clear_target(db, t)?;
            }
        }
        // Finished copies on record that nothing loaded since a restart.
        for r in records_of(db, source)? {
            if !inner.by_target.contains_key(&r.spec.target) && !keep(r.spec.op) {
                clear_target(db, r.spec.target)?;
            }
        }
        Ok(())
    }

    /// [`Mirrors::reset_source`] before a snapshot is installed into
    /// `source` (or an interrupted install is redone), keeping the copies of
    /// operations frozen or ended in the source's state as stored now (the
    /// state before the install).
    pub fn reset_for_install(&self, db: &Db, source: ShardId) -> io::Result<()> {
        let meta = storage::cf(db, storage::CF_GROUP_META);
        let Some(raw) = db.get_pinned_cf(meta, state_key(source, tag::SM_STATE)).map_err(storage::io_err)? else {
            return Ok(());
        };
        // Only a shard's state has copies; the directory's group stores its
        // state in another form.
        if !raw.starts_with(br#"{"Shard""#) {
            return Ok(());
        }
        let SmState::Shard(state) = SmState::from_json(&raw)? else { return Ok(()) };
        let frozen = |op: OpId| state.captures.iter().any(|c| c.op_id == op && c.frozen_at.is_some());
        self.reset_source(db, source, |op| frozen(op) || state.has_ended(op))
    }

    /// [`Mirrors::reset_for_install`] if an install into `group` was cut
    /// short here (its marker is on disk) and is about to be redone.
    pub fn reset_if_interrupted(&self, db: &Db, group: ShardId) -> io::Result<()> {
        let meta = storage::cf(db, storage::CF_GROUP_META);
        if db.get_pinned_cf(meta, state_key(group, tag::INSTALLING)).map_err(storage::io_err)?.is_some() {
            self.reset_for_install(db, group)?;
        }
        Ok(())
    }

    /// The snapshot into `source` is in place: copies may read it.
    pub fn installed(&self, source: ShardId) {
        self.inner.lock().unwrap().installing.remove(&source);
    }

    /// A snapshot of the target's own group is about to replace its data:
    /// the group's content comes from its leader from now on, and no copy
    /// here may write into it again. Its record goes; its keys are the
    /// install's to replace.
    pub fn target_installing(&self, db: &Db, target: ShardId) -> io::Result<()> {
        let m = {
            let mut inner = self.inner.lock().unwrap();
            inner.deleted.insert(target);
            inner.by_target.remove(&target)
        };
        if let Some(m) = m {
            m.cancel();
        }
        let mut batch = rocksdb::WriteBatch::default();
        delete_record(db, &mut batch, target);
        db.write(batch).map_err(storage::io_err)
    }

    /// What this node has of the mirror of `spec` (starting it if needed).
    pub fn report(self: &Arc<Self>, db: &Arc<Db>, root: &Path, spec: &MirrorSpec) -> io::Result<Option<MirrorReport>> {
        let Some(m) = self.ensure(db, root, spec)? else { return Ok(None) };
        let frozen_at = source_frozen_at(db, spec)?;
        let meta = storage::cf(db, storage::CF_GROUP_META);
        let applied = db
            .get_pinned_cf(meta, state_key(spec.source, tag::APPLIED))
            .map_err(storage::io_err)?
            .and_then(|b| crate::raft::decode_applied_index(&b))
            .unwrap_or(0);
        let done = m.is_done();
        Ok(Some(MirrorReport { done, figures: m.figures(), frozen_at, attempt: m.attempt, applied }))
    }

    /// Writes an apply batch holding `writes` (mirrored writes of the
    /// source) with `write`: each write below its mirror's cursor goes into
    /// the batch under the target's keys; one in a chunk being copied is
    /// remembered for the copy to read again. The mirrors stay locked until
    /// the batch is written, so the copy sees the batch whole or not at all.
    pub fn write_with(
        &self,
        db: &Db,
        mut batch: rocksdb::WriteBatch,
        writes: Vec<MirrorWrite>,
        write: impl FnOnce(rocksdb::WriteBatch) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut targets: Vec<ShardId> = writes.iter().map(|w| w.target).collect();
        targets.sort_unstable();
        targets.dedup();
        let mirrors: Vec<Arc<Mirror>> =
            targets.iter().filter_map(|t| self.loaded(db, *t).transpose()).collect::<io::Result<_>>()?;
        let mut locked: Vec<_> = mirrors.iter().map(|m| (m, m.progress.lock().unwrap())).collect();
        for w in &writes {
            let Some((m, p)) = locked.iter_mut().find(|(m, _)| m.spec.target == w.target) else { continue };
            if p.cancelled || !m.spec.covers(&w.key) {
                continue;
            }
            if p.below_cursor(&w.key) {
                kv::write_record(db, &mut batch, w.target, &w.key, &w.record, &w.encoded);
                p.figures.add(w.live, w.digest);
            } else if p.chunk.as_deref().is_some_and(|c| w.key.as_str() >= c) {
                p.touched.insert(w.key.clone());
            }
        }
        for (m, p) in &locked {
            if p.cursor == Cursor::Done && !p.cancelled {
                put_record(db, &mut batch, &m.spec, &p.figures)?;
            }
        }
        write(batch)
    }

    /// The mirror into `target`: the running one, or a finished one on
    /// record (after a restart, before anything asked for it).
    fn loaded(&self, db: &Db, target: ShardId) -> io::Result<Option<Arc<Mirror>>> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(m) = inner.by_target.get(&target) {
            return Ok(Some(m.clone()));
        }
        if inner.deleted.contains(&target) || inner.activated.contains(&target) {
            return Ok(None);
        }
        let Some(r) = read_record(db, target)? else { return Ok(None) };
        if installing(&inner, db, r.spec.source)? {
            return Ok(None);
        }
        Ok(Some(r).map(|r| {
            let m = Mirror::new(r.spec, Some(r.figures));
            inner.by_target.insert(target, m.clone());
            m
        }))
    }
}

/// Where one copy writes its chunk files: a folder of its own, so that a
/// copy that ends (and removes its folder) never takes a later copy's files.
fn chunk_dir(root: &Path, target: ShardId) -> PathBuf {
    root.join("mirror").join(format!("g{target}-{:016x}", rand::random::<u64>()))
}

/// Removes the chunk files of copies a stopped process left (at start-up,
/// before any copy runs).
pub fn remove_leftovers(root: &Path) -> io::Result<()> {
    crate::split::sst::remove_dir(&root.join("mirror"))
}

fn read_record(db: &Db, target: ShardId) -> io::Result<Option<Record>> {
    let meta = storage::cf(db, storage::CF_GROUP_META);
    match db.get_pinned_cf(meta, state_key(target, tag::MIRROR)).map_err(storage::io_err)? {
        Some(b) => Ok(Some(serde_json::from_slice(&b).map_err(io::Error::other)?)),
        None => Ok(None),
    }
}

/// Whether a snapshot is being installed into `source` here: announced
/// ([`Mirrors::reset_source`]), or on disk (an install a stop interrupted,
/// to be redone when the replica opens again).
fn installing(inner: &Inner, db: &Db, source: ShardId) -> io::Result<bool> {
    let meta = storage::cf(db, storage::CF_GROUP_META);
    Ok(inner.installing.contains(&source)
        || db.get_pinned_cf(meta, state_key(source, tag::INSTALLING)).map_err(storage::io_err)?.is_some())
}

/// The finished copies on record whose source is `source`.
fn records_of(db: &Db, source: ShardId) -> io::Result<Vec<Record>> {
    let meta = storage::cf(db, storage::CF_GROUP_META);
    let mut out = Vec::new();
    for item in db.iterator_cf(meta, rocksdb::IteratorMode::Start) {
        let (k, v) = item.map_err(storage::io_err)?;
        if k.len() == 9 && k[8] == tag::MIRROR {
            let r: Record = serde_json::from_slice(&v).map_err(io::Error::other)?;
            if r.spec.source == source {
                out.push(r);
            }
        }
    }
    Ok(out)
}

fn put_record(db: &Db, batch: &mut rocksdb::WriteBatch, spec: &MirrorSpec, figures: &Figures) -> io::Result<()> {
    let meta = storage::cf(db, storage::CF_GROUP_META);
    let rec = Record { spec: spec.clone(), figures: *figures };
    batch.put_cf(meta, state_key(spec.target, tag::MIRROR), serde_json::to_vec(&rec).map_err(io::Error::other)?);
    Ok(())
}

/// Deletes the finished copy's record of `target` (at its activation).
pub fn delete_record(db: &Db, batch: &mut rocksdb::WriteBatch, target: ShardId) {
    batch.delete_cf(storage::cf(db, storage::CF_GROUP_META), state_key(target, tag::MIRROR));
}

/// Whether the source's replica here captures `spec`'s range, mirrored.
fn captured(db: &Db, spec: &MirrorSpec) -> io::Result<bool> {
    Ok(matches!(read_state(db, spec.source)?, Some(SmState::Shard(s)) if s.captures.iter().any(|c|
        c.op_id == spec.op && c.mirror && c.target == spec.target && c.start == spec.start && c.end == spec.end)))
}

/// Waits until the source's replica on this node applied the freeze of
/// `spec`'s split (or already dropped the range, which comes after it).
pub async fn wait_source_frozen(db: &Db, spec: &MirrorSpec) -> io::Result<()> {
    while source_frozen_at(db, spec)?.is_none() {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    Ok(())
}

/// The source's freeze index of `spec`'s split as applied here (`u64::MAX`
/// once the source dropped the range: it had everything before).
fn source_frozen_at(db: &Db, spec: &MirrorSpec) -> io::Result<Option<u64>> {
    Ok(match read_state(db, spec.source)? {
        Some(SmState::Shard(s)) => {
            s.captures.iter().find(|c| c.op_id == spec.op).map_or(Some(u64::MAX), |c| c.frozen_at)
        }
        _ => Some(u64::MAX),
    })
}

fn read_state(db: &Db, group: ShardId) -> io::Result<Option<SmState>> {
    let meta = storage::cf(db, storage::CF_GROUP_META);
    match db.get_pinned_cf(meta, state_key(group, tag::SM_STATE)).map_err(storage::io_err)? {
        Some(b) => Ok(Some(SmState::from_json(&b)?)),
        None => Ok(None),
    }
}

/// Deletes `target`'s user keys and its mirror record. A target with no
/// keys gets no range deletion: one in the memtable would make the first
/// ingest flush it.
fn clear_target(db: &Db, target: ShardId) -> io::Result<()> {
    let cf = storage::cf(db, storage::CF_DATA);
    let mut batch = rocksdb::WriteBatch::default();
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(kv::user_data_end(target));
    let from = data_key(target, b"");
    let mut keys = db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward));
    if keys.next().transpose().map_err(storage::io_err)?.is_some() {
        batch.delete_range_cf(cf, from.clone(), kv::user_data_end(target));
    }
    delete_record(db, &mut batch, target);
    db.write(batch).map_err(storage::io_err)
}

fn chunk_bytes() -> u64 {
    if cfg!(test) {
        TEST_CHUNK_BYTES
    } else {
        CHUNK_BYTES
    }
}

/// The copy (see the module's doc). Blocking; runs on a bulk thread.
fn copy_range(db: &Db, dir: &Path, m: &Mirror, limit: &mut crate::split::sst::RateLimit) -> io::Result<()> {
    let copied = copy_chunks(db, dir, m, limit);
    // A chunk file left by a cancel or a failure.
    let _ = crate::split::sst::remove_dir(dir);
    copied
}

fn copy_chunks(db: &Db, dir: &Path, m: &Mirror, limit: &mut crate::split::sst::RateLimit) -> io::Result<()> {
    let spec = &m.spec;
    let started = std::time::Instant::now();
    {
        {
            let _gate = m.gate.lock().unwrap();
            if m.progress.lock().unwrap().cancelled {
                return Ok(());
            }
            // What an earlier copy of this node left (it crashed): gone.
            clear_target(db, spec.target)?;
            crate::split::sst::remove_dir(dir)?;
            std::fs::create_dir_all(dir)?;
        }
        let mut n = 0u64;
        loop {
            let _gate = m.gate.lock().unwrap();
            let from = {
                let mut p = m.progress.lock().unwrap();
                let from = match (&p.cursor, p.cancelled) {
                    (_, true) | (Cursor::Done, _) => return Ok(()),
                    (Cursor::At(k), false) => k.clone(),
                };
                p.chunk = Some(from.clone());
                p.touched.clear();
                from
            };
            n += 1;
            let path = dir.join(format!("{n}.sst"));
            let (next, figures) = write_chunk(db, spec, &from, &path)?;
            // Outside the gate: a cancel need not wait for the rate.
            drop(_gate);
            limit.consume(figures.copied);
            let _gate = m.gate.lock().unwrap();
            if m.progress.lock().unwrap().cancelled {
                return Ok(());
            }
            if figures.copied > 0 {
                let mut opts = rocksdb::IngestExternalFileOptions::default();
                opts.set_move_files(true);
                let cf = storage::cf(db, storage::CF_DATA);
                db.ingest_external_file_cf_opts(cf, &opts, vec![&path]).map_err(storage::io_err)?;
            }
            let _ = std::fs::remove_file(&path);
            let mut p = m.progress.lock().unwrap();
            if p.cancelled {
                return Ok(());
            }
            p.figures.keys += figures.keys;
            p.figures.bytes += figures.bytes;
            p.figures.digest = p.figures.digest.wrapping_add(figures.digest);
            p.figures.copied += figures.copied;
            // Keys A wrote while the chunk was read: as A holds them now.
            let mut batch = rocksdb::WriteBatch::default();
            let touched: Vec<String> = p
                .touched
                .iter()
                .filter(|k| k.as_str() >= from.as_str() && next.as_deref().is_none_or(|e| k.as_str() < e))
                .cloned()
                .collect();
            for key in touched {
                let now = kv::read(db, spec.source, &key)?;
                let old = kv::read(db, spec.target, &key)?;
                if now == old {
                    continue;
                }
                match &now {
                    Some(r) => {
                        kv::write_record(db, &mut batch, spec.target, &key, r, &r.encode());
                        p.figures.replace(&key, old.as_ref(), r);
                    }
                    None => {
                        batch.delete_cf(storage::cf(db, storage::CF_DATA), data_key(spec.target, key.as_bytes()));
                        if let Some(o) = &old {
                            // Absent is a vacant record: its hash and size are 0.
                            p.figures.replace(&key, Some(o), &ValueRecord::deleted(0));
                        }
                    }
                }
            }
            let done = next.is_none();
            if done && !captured(db, spec)? {
                // The source's replica here no longer holds the range (it
                // was deleted, or replaced by a snapshot): what was read of
                // it may be partial.
                return Err(io::Error::other("the source replica here no longer captures the range"));
            }
            let p_copied = p.figures.copied;
            if done {
                put_record(db, &mut batch, spec, &p.figures)?;
            }
            db.write(batch).map_err(storage::io_err)?;
            // Moved on only once written (a failed write ends this copy
            // with the cursor where it was).
            p.touched.clear();
            p.chunk = None;
            p.cursor = match next {
                Some(k) => Cursor::At(k),
                None => Cursor::Done,
            };
            if done {
                // Durable before anyone is told: the split freezes on it.
                db.flush_wal(true).map_err(storage::io_err)?;
                drop(p);
                m.done.send_replace(true);
                metrics::counter!("cleave_split_mirror_copies_total").increment(1);
                let (mib, secs) = (p_copied as f64 / (1 << 20) as f64, started.elapsed().as_secs_f64());
                tracing::info!(shard = spec.target, op = spec.op, "mirror copy done: {mib:.1} MiB in {secs:.2} s");
                return Ok(());
            }
        }
    }
}

/// Writes A's records from `from` on, under B's keys, into the table file
/// `path`, up to [`chunk_bytes`] of user bytes. Answers the first key not
/// copied (`None`: the range is done) and the figures of what was.
fn write_chunk(db: &Db, spec: &MirrorSpec, from: &str, path: &Path) -> io::Result<(Option<String>, Figures)> {
    let cf = storage::cf(db, storage::CF_DATA);
    let upper = match &spec.end {
        Some(e) => data_key(spec.source, e.as_bytes()),
        None => kv::user_data_end(spec.source),
    };
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(upper);
    opts.fill_cache(false);
    let iter = db.iterator_cf_opt(
        cf,
        opts,
        rocksdb::IteratorMode::From(&data_key(spec.source, from.as_bytes()), rocksdb::Direction::Forward),
    );
    let mut wopts = storage::data_cf_options();
    // Written back a MiB at a time as it fills, not all at the ingest's
    // fsync: a burst of 16 MiB queues the foreground's WAL syncs behind it.
    wopts.set_bytes_per_sync(1 << 20);
    let mut figures = Figures::default();
    let mut writer: Option<rocksdb::SstFileWriter<'_>> = None;
    for item in iter {
        let (k, v) = item.map_err(storage::io_err)?;
        let user_key = storage::user_key_of(&k);
        let key = std::str::from_utf8(user_key).map_err(|_| io::Error::other("a stored key is not UTF-8"))?;
        if figures.copied >= chunk_bytes() {
            finish(writer.take())?;
            return Ok((Some(key.to_string()), figures));
        }
        match ValueRecord::peek_plain(&v) {
            // Most records: no transaction part, nothing to decode.
            Some((tombstone, json_len)) => {
                let live = match tombstone {
                    true => StatsDelta::default(),
                    false => StatsDelta { keys: 1, bytes: (key.len() + json_len) as i64 },
                };
                figures.add(live, digest::stored_hash(key, &v));
            }
            None => figures.replace(key, None, &storage::decode_record(user_key, &v)?),
        }
        figures.copied += (user_key.len() + v.len()) as u64;
        if writer.is_none() {
            let w = rocksdb::SstFileWriter::create(&wopts);
            w.open(path).map_err(storage::io_err)?;
            writer = Some(w);
        }
        writer.as_mut().expect("opened").put(data_key(spec.target, user_key), &v).map_err(storage::io_err)?;
    }
    finish(writer)?;
    Ok((None, figures))
}

fn finish(writer: Option<rocksdb::SstFileWriter<'_>>) -> io::Result<()> {
    if let Some(mut w) = writer {
        w.finish().map_err(storage::io_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{KvCommand, KvOp};
    use crate::kv::{ApplyBatch, Capture, Incoming, ShardState};
    use crate::testing::{noise, temp_db, whole_shard, GROUP, NOISE_SEED};

    const TARGET: u64 = 9;
    const OP: OpId = 5;

    fn spec() -> MirrorSpec {
        MirrorSpec { source: GROUP, target: TARGET, op: OP, start: "m".into(), end: Some("t".into()) }
    }

    fn store_state(db: &Db, group: u64, s: ShardState) {
        let meta = storage::cf(db, storage::CF_GROUP_META);
        db.put_cf(meta, state_key(group, tag::SM_STATE), SmState::Shard(s).to_json().unwrap()).unwrap();
    }

    /// A source with `n` keys over the alphabet and a mirrored capture of
    /// `[m, t)`, and a target receiving it.
    fn setup(n: usize) -> (tempfile::TempDir, Arc<Db>, ShardState) {
        let (dir, db) = temp_db();
        let mut s = whole_shard();
        let mut x = NOISE_SEED;
        for i in 0..n {
            let key = format!("{}{i:04}", (b'a' + (i % 26) as u8) as char);
            apply(&db, None, &mut s, i as u64 + 1, put(&key, &format!("\"{}\"", noise(&mut x, 40))));
        }
        s.captures.push(capture(true));
        store_state(&db, GROUP, s.clone());
        let incoming = Incoming { mirror_of: Some(GROUP), ..Incoming::new(OP, "m".into(), Some("t".into())) };
        store_state(&db, TARGET, ShardState { incoming: Some(incoming), ..Default::default() });
        (dir, db, s)
    }

    /// The capture of `[m, t)` for operation `OP` into `TARGET`.
    fn capture(mirror: bool) -> Capture {
        let (start, end) = ("m".into(), Some("t".into()));
        Capture::new(OP, start, end, TARGET, mirror)
    }

    fn put(key: &str, json: &str) -> KvOp {
        KvOp::Put { key: key.into(), value: json.into(), if_version: None }
    }

    /// Applies `op` to the source as its state machine would, mirrored
    /// through `mirrors` when given.
    fn apply(db: &Db, mirrors: Option<&Mirrors>, s: &mut ShardState, index: u64, op: KvOp) {
        let mut b = ApplyBatch::default();
        let cmd = KvCommand { range_id: 1, epoch: 1, op };
        let _ = kv::apply(db, GROUP, index, s, &mut b, &cmd).unwrap();
        let mirrored = std::mem::take(&mut b.mirrored);
        let write = |w: rocksdb::WriteBatch| db.write(w).map_err(storage::io_err);
        match mirrors {
            Some(m) => m.write_with(db, b.write, mirrored, write).unwrap(),
            None => write(b.write).unwrap(),
        }
    }

    /// `(key, record)` of `group`'s user keys in `[m, t)`.
    fn contents(db: &Db, group: u64) -> Vec<(String, ValueRecord)> {
        let cf = storage::cf(db, storage::CF_DATA);
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(data_key(group, b"t"));
        let from = data_key(group, b"m");
        db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward))
            .map(|i| {
                let (k, v) = i.unwrap();
                (String::from_utf8(storage::user_key_of(&k).to_vec()).unwrap(), ValueRecord::decode(&v).unwrap())
            })
            .collect()
    }

    async fn done(m: Arc<Mirror>) {
        let waited = tokio::time::timeout(std::time::Duration::from_secs(20), m.wait_done()).await;
        assert!(waited.is_ok(), "the copy did not finish (it failed: see the log)");
    }

    fn figures_of(records: &[(String, ValueRecord)]) -> (u64, u64, u64) {
        let mut f = Figures::default();
        for (k, r) in records {
            f.replace(k, None, r);
        }
        (f.keys, f.bytes, f.digest)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_copy_and_the_writes_made_during_it_leave_the_source_range_exactly() {
        for round in 0..4u64 {
            let (dir, db, mut s) = setup(600);
            // Slowed down (~0.3 s for the range), so that the writes race it.
            let mirrors = Arc::new(Mirrors::with_rate(64 << 10));
            let m = mirrors.ensure(&db, dir.path(), &spec()).unwrap().expect("a mirror starts");
            // Writes over the whole key space while the copy runs (chunks of
            // a few dozen records: many chunks, writes racing each), then
            // after it.
            let mut x = NOISE_SEED ^ round;
            let mut index = 10_000;
            let (mut during, mut after) = (0, 0);
            let started = std::time::Instant::now();
            while after < 300 {
                assert!(started.elapsed() < std::time::Duration::from_secs(30), "the copy never finished");
                if m.is_done() {
                    after += 1;
                } else {
                    during += 1;
                }
                if index % 10 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                index += 1;
                let key =
                    format!("{}{:04}", (b'a' + (noise(&mut x, 1).as_bytes()[0] - b'a') % 26) as char, index % 700);
                let op = if index % 5 == 0 {
                    KvOp::Delete { key, if_version: None }
                } else {
                    put(&key, &format!("\"{}\"", noise(&mut x, 30)))
                };
                apply(&db, Some(&mirrors), &mut s, index, op);
            }
            done(m.clone()).await;
            assert!(during > 100, "round {round}: only {during} writes raced the copy");
            let (source, target) = (contents(&db, GROUP), contents(&db, TARGET));
            assert!(source.len() > 100, "the range holds data");
            assert_eq!(source, target, "round {round}: the target holds the source's range, record for record");
            let f = m.figures();
            assert_eq!((f.keys, f.bytes, f.digest), figures_of(&target), "the figures are the content's");
            let rec = read_record(&db, TARGET).unwrap().expect("the finished copy is on record");
            assert_eq!(rec.figures, f, "the record follows the writes made after the copy");
            assert!(contents(&db, TARGET).iter().all(|(k, _)| k.as_str() >= "m" && k.as_str() < "t"));
        }
    }

    #[tokio::test]
    async fn a_restarted_node_mirrors_from_the_record_and_a_snapshot_resets_the_copy() {
        let (dir, db, mut s) = setup(200);
        let mirrors = Arc::new(Mirrors::default());
        done(mirrors.ensure(&db, dir.path(), &spec()).unwrap().unwrap()).await;
        // A new process: nothing in memory, the record on disk.
        let after = Arc::new(Mirrors::default());
        apply(&db, Some(&after), &mut s, 5000, put("n-new", "1"));
        assert_eq!(contents(&db, GROUP), contents(&db, TARGET), "the write reached the target");
        let m = after.get(TARGET).expect("loaded from the record");
        assert!(m.is_done());
        assert_eq!((m.figures().keys, m.figures().bytes, m.figures().digest), figures_of(&contents(&db, TARGET)));
        // A snapshot into the source: the copy's keys and record go.
        after.reset_source(&db, GROUP, |_| false).unwrap();
        after.installed(GROUP);
        assert!(contents(&db, TARGET).is_empty());
        assert_eq!(read_record(&db, TARGET).unwrap(), None);
        assert!(after.get(TARGET).is_none());
        // ... and the next ask copies again.
        done(after.ensure(&db, dir.path(), &spec()).unwrap().unwrap()).await;
        assert_eq!(contents(&db, GROUP), contents(&db, TARGET));
    }

    #[tokio::test]
    async fn nothing_is_mirrored_where_the_target_does_not_receive_or_was_deleted() {
        let (dir, db, _) = setup(50);
        let mirrors = Arc::new(Mirrors::default());
        let other_op = MirrorSpec { op: OP + 1, ..spec() };
        assert!(mirrors.ensure(&db, dir.path(), &other_op).unwrap().is_none(), "another operation");
        store_state(&db, TARGET, ShardState::default());
        assert!(mirrors.ensure(&db, dir.path(), &spec()).unwrap().is_none(), "an active target");
        let (dir, db, _) = setup(50);
        mirrors.forget(TARGET);
        assert!(mirrors.ensure(&db, dir.path(), &spec()).unwrap().is_none(), "a deleted target");
        let mirrors = Arc::new(Mirrors::default());
        let mut s = whole_shard();
        s.captures.push(capture(false));
        store_state(&db, GROUP, s);
        assert!(mirrors.ensure(&db, dir.path(), &spec()).unwrap().is_none(), "a capture that is not mirrored");
    }
}
