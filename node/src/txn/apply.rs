//! A shard applying the steps of a transaction (see `docs/plans/transactions.md`).
//!
//! Every step is one Raft entry, applied here deterministically: what it
//! refuses depends only on the command and the records it finds. Every key
//! a step names carries the range id and epoch it was routed with, and is
//! refused at apply as a single-key write would be (`WrongRange`,
//! `RangeMoving`), so a split or a move in between never lets a step write
//! a range this shard no longer owns.
//!
//! Locks and outcomes are parts of the keys' records ([`TxnInfo`]), written
//! with [`kv::store`] like any value: a split's forward log and backfill, a
//! move's snapshot carry them.

use cleave_metadata::RangeId;
use serde::{Deserialize, Serialize};

use super::plan::{self, Decided, Stored, Txn};
use crate::clock::Ts;
use crate::command::KvError;
use crate::kv::{self, Applied, ApplyBatch, ShardState};
use crate::storage::txn_info::{Lock, Outcome, PendingWrite, TxnId, TxnInfo};
use crate::storage::{Db, ValueRecord};

/// A key and the route it was sent on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Routed {
    pub key: String,
    pub range_id: RangeId,
    pub epoch: u64,
}

/// A step of a transaction on one shard.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum TxnCommand {
    /// Every key of `txn` is on this shard: decide and write in this entry.
    /// A key locked by any transaction refuses it (`Locked`).
    OnePhase { keys: Vec<Routed>, txn: Txn },
    /// Lock `keys` (each with whether `txn` may write it) for `txn`;
    /// answers each key's stored state, in order. A key locked by another
    /// transaction refuses the whole entry; the primary refuses if `txn`
    /// was aborted there (see [`TxnInfo::refuses_primary_lock`]): a lock
    /// step that arrives after its transaction was aborted never holds it.
    Lock { txn: TxnId, primary: String, expires_ms: u64, keys: Vec<(Routed, bool)> },
    /// The commit point, on the primary's shard: only while `primary` is
    /// still locked by `txn`, write `writes` of this shard's `keys`,
    /// release their locks and record `Committed { writes }` (every
    /// shard's) on the primary. Answers the outcome. With no writes (a
    /// transaction that only read) it records nothing: it proves that every
    /// lock was still held, all at once, when it applied.
    CommitPrimary { txn: TxnId, primary: Routed, keys: Vec<Routed>, writes: Vec<PendingWrite>, now_ms: u64 },
    /// Finishes a committed `txn` on `keys`: writes what `writes` lists for
    /// them and releases their locks; a key not locked by `txn` is skipped
    /// (already finished).
    Commit { txn: TxnId, keys: Vec<Routed>, writes: Vec<PendingWrite> },
    /// Releases the locks `txn` holds on `keys`.
    Rollback { txn: TxnId, keys: Vec<Routed> },
    /// Asks `txn`'s primary for its outcome. Still locked and not expired
    /// at `now_ms` (and not `abort_if_pending`): pending. Otherwise, with no
    /// outcome yet, `txn` is aborted here and now: the primary's lock is
    /// released and `Aborted` recorded, so a commit can no longer land.
    /// `expires_ms` is when `txn`'s locks expire (from a lock of it the
    /// asker met): kept with the outcome, it says how long to keep it.
    Resolve { txn: TxnId, primary: Routed, now_ms: u64, expires_ms: u64, abort_if_pending: bool },
    /// Drops the primary's record of `txn` once all its keys are finished.
    Forget { txn: TxnId, primary: Routed },
}

/// What the primary says about a transaction.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Pending,
    /// Committed with these writes (every shard's), at this timestamp
    /// (0: recorded before commit timestamps).
    Committed(Vec<PendingWrite>, Ts),
    Aborted,
}

/// What a step answers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum TxnReply {
    /// `OnePhase`.
    Decided(Decided),
    /// `Lock`: the keys' stored states, in the command's order, and the
    /// timestamp the locks were taken at: the transaction must commit at
    /// or above it (`watch`).
    Locked(Vec<Stored>, Ts),
    /// `CommitPrimary`, `Resolve`.
    Status(Status),
    /// `Commit`, `Rollback`, `Forget`.
    Done,
}

impl TxnCommand {
    /// The step's name, transaction and keys, for logs (no values).
    pub fn summary(&self) -> String {
        let keys = || self.routes().iter().map(|r| r.key.as_str()).collect::<Vec<_>>().join(",");
        match self {
            TxnCommand::OnePhase { .. } => format!("one-phase [{}]", keys()),
            TxnCommand::Lock { txn, .. } => format!("lock {txn:032x} [{}]", keys()),
            TxnCommand::CommitPrimary { txn, .. } => format!("commit-primary {txn:032x} [{}]", keys()),
            TxnCommand::Commit { txn, .. } => format!("commit {txn:032x} [{}]", keys()),
            TxnCommand::Rollback { txn, .. } => format!("rollback {txn:032x} [{}]", keys()),
            TxnCommand::Resolve { txn, abort_if_pending, .. } => {
                format!("resolve {txn:032x} [{}] abort_if_pending={abort_if_pending}", keys())
            }
            TxnCommand::Forget { txn, .. } => format!("forget {txn:032x} [{}]", keys()),
        }
    }

    /// Every key the step names, with its route.
    fn routes(&self) -> Vec<&Routed> {
        match self {
            TxnCommand::OnePhase { keys, .. } | TxnCommand::Commit { keys, .. } | TxnCommand::Rollback { keys, .. } => {
                keys.iter().collect()
            }
            TxnCommand::Lock { keys, .. } => keys.iter().map(|(r, _)| r).collect(),
            TxnCommand::CommitPrimary { primary, keys, .. } => std::iter::once(primary).chain(keys).collect(),
            TxnCommand::Resolve { primary, .. } | TxnCommand::Forget { primary, .. } => vec![primary],
        }
    }
}

/// A key's stored state for a transaction.
pub fn stored(rec: Option<&ValueRecord>) -> Stored {
    match rec {
        None => Stored::default(),
        Some(r) if r.tombstone => Stored { version: r.version, value: None },
        Some(r) => Stored { version: r.version, value: Some(String::from_utf8_lossy(&r.json).into_owned()) },
    }
}

/// The record `write` leaves for a key whose record was `cur`, its
/// transaction part kept (outcomes) less the lock.
fn written(cur: Option<&ValueRecord>, write: &PendingWrite) -> ValueRecord {
    let rec = match &write.value {
        Some(v) => ValueRecord::live(write.version, v.as_bytes().to_vec()),
        None => ValueRecord::deleted(write.version),
    };
    rec.with_txn(TxnInfo { lock: None, ..txn_of(cur) })
}

fn txn_of(rec: Option<&ValueRecord>) -> TxnInfo {
    rec.and_then(|r| r.txn.as_deref().cloned()).unwrap_or_default()
}

/// `cur` (an absent key: a version-0 tombstone) with its transaction part
/// changed by `f`.
fn with_txn(cur: Option<&ValueRecord>, f: impl FnOnce(&mut TxnInfo)) -> ValueRecord {
    let mut info = txn_of(cur);
    f(&mut info);
    let base = cur.cloned().unwrap_or_else(|| ValueRecord::deleted(0));
    base.with_txn(info)
}

/// The lock `txn` holds on the key whose record is `rec`, if it holds one.
fn lock_of(rec: Option<&ValueRecord>, txn: TxnId) -> Option<&Lock> {
    rec.and_then(ValueRecord::lock).filter(|l| l.txn == txn)
}

fn held_by(rec: Option<&ValueRecord>, txn: TxnId) -> bool {
    lock_of(rec, txn).is_some()
}

/// Applies one transaction step at log `index` into `b`.
pub fn apply(
    db: &Db,
    group: u64,
    index: u64,
    state: &mut ShardState,
    b: &mut ApplyBatch,
    cmd: &TxnCommand,
) -> Applied<TxnReply, KvError> {
    let r = apply_step(db, group, index, state, b, cmd);
    kv::flush_forwarded(db, group, b);
    r
}

fn apply_step(
    db: &Db,
    group: u64,
    index: u64,
    state: &mut ShardState,
    b: &mut ApplyBatch,
    cmd: &TxnCommand,
) -> Applied<TxnReply, KvError> {
    for r in cmd.routes() {
        if let Err(e) = kv::check_writable(state, &r.key, r.range_id, r.epoch) {
            return Ok(Err(e));
        }
    }
    let at = At { db, group, index };
    let cur = |b: &ApplyBatch, key: &str| at.current(b, key);
    let put = |state: &mut ShardState, b: &mut ApplyBatch, key: &str, old: Option<&ValueRecord>, new| {
        at.store(state, b, key, old, new)
    };
    Ok(Ok(match cmd {
        TxnCommand::OnePhase { keys, txn } => {
            let mut states = std::collections::HashMap::new();
            for r in keys {
                let rec = cur(b, &r.key)?;
                if let Some(lock) = rec.as_ref().and_then(ValueRecord::lock) {
                    return Ok(Err(KvError::Locked { key: r.key.clone(), lock: lock.clone() }));
                }
                states.insert(r.key.clone(), rec);
            }
            let decided = plan::evaluate(txn, |k| stored(states.get(k).and_then(Option::as_ref)));
            for w in &decided.writes {
                let old = states.get(&w.key).and_then(Option::as_ref);
                put(state, b, &w.key, old, written(old, w));
            }
            TxnReply::Decided(decided)
        }
        TxnCommand::Lock { txn, primary, expires_ms, keys } => {
            // A split waits to freeze the range for its open write locks:
            // no new one (retried until the cutover is over).
            let freezing = |k: &str| state.captures.iter().any(|c| c.freezing && c.covers(k));
            if keys.iter().any(|(r, write)| *write && freezing(&r.key)) {
                return Ok(Err(KvError::RangeMoving));
            }
            let mut recs = Vec::with_capacity(keys.len());
            for (r, _) in keys {
                let rec = cur(b, &r.key)?;
                match rec.as_ref().and_then(ValueRecord::lock) {
                    Some(l) if l.txn != *txn => {
                        return Ok(Err(KvError::Locked { key: r.key.clone(), lock: l.clone() }))
                    }
                    _ => {}
                }
                if r.key == *primary && txn_of(rec.as_ref()).refuses_primary_lock(*txn, *expires_ms) {
                    return Ok(Err(KvError::TxnAborted));
                }
                recs.push(rec);
            }
            let mut out = Vec::with_capacity(keys.len());
            for ((r, write), rec) in keys.iter().zip(recs) {
                out.push(stored(rec.as_ref()));
                let was_write = rec.as_ref().and_then(ValueRecord::lock).is_some_and(|l| l.write);
                let lock =
                    Lock { txn: *txn, primary: primary.clone(), expires_ms: *expires_ms, write: *write || was_write };
                let new = with_txn(rec.as_ref(), |t| t.lock = Some(lock));
                put(state, b, &r.key, rec.as_ref(), new);
            }
            TxnReply::Locked(out, b.ts)
        }
        TxnCommand::CommitPrimary { txn, primary, keys, writes, now_ms } => {
            let prec = cur(b, &primary.key)?;
            let Some(expires_ms) = lock_of(prec.as_ref(), *txn).map(|l| l.expires_ms) else {
                let outcome = txn_of(prec.as_ref()).outcome(*txn).cloned();
                return Ok(Ok(TxnReply::Status(status_of(outcome.as_ref()))));
            };
            // The commit timestamp: this entry's, which its coordinator
            // stamped above every lock's (`TxnReply::Locked`).
            let commit_ts = b.ts;
            b.origin = crate::watch::cursor::txn_origin(*txn);
            at.finish(state, b, keys, writes, *txn)?;
            if !writes.is_empty() {
                // The primary, finished above, now records the outcome.
                let prec = cur(b, &primary.key)?;
                let outcome = Outcome { txn: *txn, committed: Some(writes.clone()), expires_ms, commit_ts };
                let new = with_txn(prec.as_ref(), |t| t.record(outcome, *now_ms));
                put(state, b, &primary.key, prec.as_ref(), new);
            }
            TxnReply::Status(Status::Committed(writes.clone(), commit_ts))
        }
        TxnCommand::Commit { txn, keys, writes } => {
            // At the transaction's commit timestamp, which the entry is
            // stamped with (below this shard's last maybe, but above the
            // locks it releases, so above anything a watcher was promised).
            if b.stamp > 0 {
                b.ts = b.stamp;
            }
            b.origin = crate::watch::cursor::txn_origin(*txn);
            at.finish(state, b, keys, writes, *txn)?;
            TxnReply::Done
        }
        TxnCommand::Rollback { txn, keys } => {
            at.finish(state, b, keys, &[], *txn)?;
            TxnReply::Done
        }
        TxnCommand::Resolve { txn, primary, now_ms, expires_ms, abort_if_pending } => {
            let prec = cur(b, &primary.key)?;
            let info = txn_of(prec.as_ref());
            match info.outcome(*txn) {
                Some(o) => TxnReply::Status(status_of(Some(o))),
                None => {
                    let lock = lock_of(prec.as_ref(), *txn);
                    if lock.is_some_and(|l| *now_ms < l.expires_ms) && !abort_if_pending {
                        TxnReply::Status(Status::Pending)
                    } else {
                        let release = lock.is_some();
                        let expires_ms = lock.map_or(*expires_ms, |l| l.expires_ms);
                        let new = with_txn(prec.as_ref(), |t| {
                            if release {
                                t.lock = None;
                            }
                            t.record(Outcome { txn: *txn, committed: None, expires_ms, commit_ts: 0 }, *now_ms);
                        });
                        put(state, b, &primary.key, prec.as_ref(), new);
                        TxnReply::Status(Status::Aborted)
                    }
                }
            }
        }
        TxnCommand::Forget { txn, primary } => {
            let prec = cur(b, &primary.key)?;
            if txn_of(prec.as_ref()).outcome(*txn).is_some() {
                let new = with_txn(prec.as_ref(), |t| t.forget(*txn));
                put(state, b, &primary.key, prec.as_ref(), new);
            }
            TxnReply::Done
        }
    }))
}

/// What a recorded outcome (or its absence, after the lock is gone) says.
fn status_of(outcome: Option<&Outcome>) -> Status {
    match outcome {
        Some(Outcome { committed: Some(w), commit_ts, .. }) => Status::Committed(w.clone(), *commit_ts),
        _ => Status::Aborted,
    }
}

/// Where a step applies: the database, the group, the entry's log index.
#[derive(Clone, Copy)]
struct At<'a> {
    db: &'a Db,
    group: u64,
    index: u64,
}

impl At<'_> {
    fn current(&self, b: &ApplyBatch, key: &str) -> std::io::Result<Option<ValueRecord>> {
        kv::current(self.db, self.group, &b.overlay, key)
    }

    fn store(
        &self,
        state: &mut ShardState,
        b: &mut ApplyBatch,
        key: &str,
        old: Option<&ValueRecord>,
        new: ValueRecord,
    ) {
        kv::store(self.db, self.group, self.index, state, b, key, old, new)
    }

    /// For each of `keys` still locked by `txn`: write what `writes` lists
    /// for it (if anything) and release the lock. A write whose version the
    /// key already has (or passed) is not written again, only the lock
    /// released: the transaction committed there before, and this lock is
    /// a late duplicate of its `Lock` (a proposal delayed on its way to the
    /// leader, applied after the commit) — writing again would take the
    /// key's version back, over whatever came after.
    fn finish(
        &self,
        state: &mut ShardState,
        b: &mut ApplyBatch,
        keys: &[Routed],
        writes: &[PendingWrite],
        txn: TxnId,
    ) -> std::io::Result<()> {
        for r in keys {
            let rec = self.current(b, &r.key)?;
            if !held_by(rec.as_ref(), txn) {
                continue;
            }
            let version = rec.as_ref().map_or(0, |r| r.version);
            let new = match writes.iter().find(|w| w.key == r.key) {
                Some(w) if w.version > version => written(rec.as_ref(), w),
                _ => with_txn(rec.as_ref(), |t| t.lock = None),
            };
            self.store(state, b, &r.key, rec.as_ref(), new);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{ShardCommand, StepError};
    use crate::testing::{put, temp_db, whole_shard, GROUP};
    use crate::txn::plan::Op;

    struct Shard {
        _dir: tempfile::TempDir,
        db: std::sync::Arc<Db>,
        state: ShardState,
        index: u64,
    }

    impl Shard {
        fn new() -> Shard {
            let (dir, db) = temp_db();
            Shard { _dir: dir, db, state: whole_shard(), index: 0 }
        }

        fn run(&mut self, cmd: TxnCommand) -> Result<TxnReply, KvError> {
            self.run_at(cmd, 0)
        }

        /// As the state machine applies an entry stamped `stamp`.
        fn run_at(&mut self, cmd: TxnCommand, stamp: Ts) -> Result<TxnReply, KvError> {
            self.index += 1;
            let mut b = ApplyBatch { ts: self.state.next_ts(stamp), stamp, ..ApplyBatch::default() };
            let r = apply(&self.db, GROUP, self.index, &mut self.state, &mut b, &cmd).expect("storage");
            self.db.write(b.write).expect("write");
            r
        }

        fn changes(&self) -> Vec<(Ts, String, u64)> {
            self.read_changes().into_iter().map(|c| (c.ts, c.key.clone(), c.version)).collect()
        }

        fn read_changes(&self) -> Vec<std::sync::Arc<crate::watch::changes::Change>> {
            let w = crate::watch::changes::Window {
                after: &crate::watch::cursor::Position::after_all(0),
                through: Ts::MAX,
                start: "",
                end: None,
                limit: usize::MAX,
                bytes: usize::MAX,
            };
            crate::watch::changes::read(&self.db, None, GROUP, &w).unwrap().0
        }

        fn put(&mut self, key: &str, json: &str) -> Result<u64, KvError> {
            self.index += 1;
            put(&self.db, &mut self.state, self.index, key, json)
        }

        fn record(&self, key: &str) -> Option<ValueRecord> {
            kv::read(&self.db, GROUP, key).unwrap()
        }
    }

    fn r(key: &str) -> Routed {
        Routed { key: key.into(), range_id: 1, epoch: 1 }
    }

    fn lock(txn: TxnId, keys: &[(&str, bool)]) -> TxnCommand {
        TxnCommand::Lock {
            txn,
            primary: keys[0].0.into(),
            expires_ms: 1_000,
            keys: keys.iter().map(|(k, w)| (r(k), *w)).collect(),
        }
    }

    fn w(key: &str, version: u64, value: Option<&str>) -> PendingWrite {
        PendingWrite { key: key.into(), version, value: value.map(str::to_string) }
    }

    #[test]
    fn locks_hold_off_writers_and_other_transactions_until_commit() {
        let mut s = Shard::new();
        s.put("a", "1").unwrap();
        let got = s.run(lock(7, &[("a", true), ("b", true)])).unwrap();
        let lock_ts = s.state.last_ts;
        assert_eq!(
            got,
            TxnReply::Locked(vec![Stored { version: 1, value: Some("1".into()) }, Stored::default()], lock_ts),
            "the stored states, an absent key as version 0, and the lock's timestamp"
        );
        assert!(matches!(s.put("a", "2"), Err(KvError::Locked { ref key, ref lock }) if key == "a" && lock.txn == 7));
        assert!(matches!(s.run(lock(8, &[("b", false)])), Err(KvError::Locked { lock, .. }) if lock.txn == 7));
        let one = TxnCommand::OnePhase { keys: vec![r("a")], txn: Txn::default() };
        assert!(matches!(s.run(one), Err(KvError::Locked { .. })), "the one-shard path respects locks too");
        assert!(
            matches!(s.run(lock(7, &[("a", true)])), Ok(TxnReply::Locked(v, _)) if v == vec![Stored { version: 1, value: Some("1".into()) }]),
            "re-locking by the holder is harmless"
        );

        let writes = vec![w("a", 2, Some("10")), w("b", 1, None)];
        let commit = TxnCommand::CommitPrimary {
            txn: 7,
            primary: r("a"),
            keys: vec![r("a"), r("b")],
            writes: writes.clone(),
            now_ms: 500,
        };
        let commit_ts = s.state.last_ts + 1;
        assert_eq!(s.run(commit.clone()), Ok(TxnReply::Status(Status::Committed(writes.clone(), commit_ts))));
        let a = s.record("a").unwrap();
        assert_eq!((a.version, a.json.as_slice(), a.lock()), (2, &b"10"[..], None));
        assert_eq!(
            a.txn.as_ref().unwrap().outcome(7).unwrap().committed.as_ref(),
            Some(&writes),
            "the primary remembers"
        );
        assert!(s.record("b").unwrap().tombstone && s.record("b").unwrap().lock().is_none());
        // A put keeps the primary's outcome; forgetting drops it.
        assert_eq!(s.put("a", "11"), Ok(3));
        assert!(s.record("a").unwrap().txn.unwrap().outcome(7).is_some());
        assert_eq!(s.run(TxnCommand::Forget { txn: 7, primary: r("a") }), Ok(TxnReply::Done));
        assert_eq!(s.record("a").unwrap().txn, None);
        // A replayed commit after that finds no lock and no outcome: aborted, nothing written.
        assert_eq!(s.run(commit), Ok(TxnReply::Status(Status::Aborted)));
        assert_eq!(s.record("a").unwrap().version, 3);
    }

    /// A transaction's `Lock` of a secondary key, delayed and applied again
    /// after the transaction committed there and another write followed,
    /// locks the key anew; the commit a reader then finishes for it must
    /// not write the key back to the transaction's older version.
    #[test]
    fn a_late_duplicate_lock_never_takes_a_key_back_to_an_older_version() {
        let mut s = Shard::new();
        let Ok(TxnReply::Locked(..)) = s.run(lock(7, &[("k", true)])) else { panic!() };
        let commit = || TxnCommand::Commit { txn: 7, keys: vec![r("k")], writes: vec![w("k", 1, Some("1"))] };
        assert_eq!(s.run(commit()), Ok(TxnReply::Done));
        assert_eq!(s.put("k", "2"), Ok(2), "a later write");
        let Ok(TxnReply::Locked(..)) = s.run(lock(7, &[("k", true)])) else { panic!("the late duplicate") };
        assert_eq!(s.run(commit()), Ok(TxnReply::Done), "finished again by a reader");
        let rec = s.record("k").unwrap();
        assert_eq!((rec.version, rec.lock().is_none()), (2, true), "released, the later write kept");
        assert_eq!(rec.json, b"2".to_vec());
    }

    /// A split that cannot freeze its range for open write locks stops new
    /// ones there, so a steady stream of transactions cannot hold it off:
    /// the open ones finish, and the next freeze gets through.
    #[test]
    fn a_refused_freeze_lets_open_locks_drain_and_takes_no_new_one() {
        let mut s = Shard::new();
        s.state.captures.push(crate::kv::Capture::new(3, "m".into(), None, 9, false));
        let Ok(TxnReply::Locked(..)) = s.run(lock(7, &[("p", true)])) else { panic!() };
        s.index += 1;
        let freeze = || ShardCommand::Freeze { op_id: 3 };
        let refused = crate::testing::step(&s.db, &mut s.state, s.index, freeze());
        assert_eq!(refused, Err(StepError::Locked { op_id: 3, keys: vec!["p".into()] }));
        assert_eq!(s.run(lock(8, &[("q", true)])), Err(KvError::RangeMoving), "no new write lock in the range");
        assert!(
            matches!(s.run(lock(8, &[("a", true), ("q", false)])), Ok(TxnReply::Locked(..))),
            "elsewhere, or to read"
        );
        let commit = TxnCommand::Commit { txn: 7, keys: vec![r("p")], writes: vec![w("p", 1, Some("1"))] };
        assert_eq!(s.run(commit), Ok(TxnReply::Done), "the open one finishes");
        s.index += 1;
        assert_eq!(
            crate::testing::step(&s.db, &mut s.state, s.index, freeze()),
            Ok(s.index),
            "and the freeze goes through"
        );
    }

    /// What a watch relies on (`watch`): a write lock holds the shard's
    /// resolved timestamp below the lock's, while other keys' writes move
    /// the shard on; the transaction's writes land at its commit timestamp
    /// — the primary's entry's, stamped above every lock, and the same on
    /// the shard that commits later, below its last timestamp by then but
    /// above anything it promised.
    #[test]
    fn a_transactions_changes_land_at_its_commit_timestamp_above_what_was_resolved() {
        let mut s = Shard::new();
        s.put("a", "1").unwrap();
        let Ok(TxnReply::Locked(_, lock_ts)) = s.run(lock(7, &[("a", true), ("b", true)])) else { panic!() };
        assert_eq!(s.state.open_locks.get("a"), Some(&lock_ts));
        assert_eq!(s.state.resolved(), lock_ts - 1);
        s.put("z", "1").unwrap();
        s.put("y", "1").unwrap();
        assert!(s.state.last_ts > lock_ts && s.state.resolved() == lock_ts - 1, "held below the lock");
        // The commit comes from another shard's primary, at a timestamp
        // between the lock and this shard's last.
        let commit_ts = lock_ts + 1;
        assert!(commit_ts < s.state.last_ts);
        let writes = vec![w("a", 2, Some("2")), w("b", 1, None)];
        let commit = TxnCommand::Commit { txn: 7, keys: vec![r("a"), r("b")], writes };
        assert_eq!(s.run_at(commit, commit_ts), Ok(TxnReply::Done));
        assert!(s.state.open_locks.is_empty());
        assert_eq!(s.state.resolved(), s.state.last_ts, "released: resolved catches up");
        let changes = s.changes();
        let at = |key: &str| changes.iter().rfind(|(_, k, _)| k == key).map(|(ts, _, v)| (*ts, *v));
        assert_eq!(at("a"), Some((commit_ts, 2)), "the commit's change, at the commit timestamp");
        assert_eq!(at("b"), None, "a delete of an absent key is no change");
        assert!(changes.iter().filter(|(_, k, _)| k == "a").count() == 2, "the put and the commit; locking is none");
        let read = s.read_changes();
        assert!(read.windows(2).all(|w| w[0].order() < w[1].order()), "in (timestamp, origin, key) order");
        let origin = s.read_changes().into_iter().rfind(|c| c.key == "a").map(|c| c.origin);
        assert_eq!(origin, Some(crate::watch::cursor::txn_origin(7)), "the transaction's changes sort together");
        // The primary's commit point answers its entry's timestamp and
        // keeps it in the outcome, for whoever finishes the others.
        let Ok(TxnReply::Locked(_, _)) = s.run(lock(8, &[("p", true)])) else { panic!() };
        let commit = TxnCommand::CommitPrimary {
            txn: 8,
            primary: r("p"),
            keys: vec![r("p")],
            writes: vec![w("p", 1, Some("1"))],
            now_ms: 1,
        };
        let stamp = s.state.last_ts + 100;
        let Ok(TxnReply::Status(Status::Committed(_, ts))) = s.run_at(commit, stamp) else { panic!() };
        assert_eq!(ts, stamp);
        assert_eq!(s.record("p").unwrap().txn.unwrap().outcome(8).unwrap().commit_ts, stamp);
        let resolve = TxnCommand::Resolve { txn: 8, primary: r("p"), now_ms: 2, expires_ms: 0, abort_if_pending: true };
        assert!(matches!(s.run(resolve), Ok(TxnReply::Status(Status::Committed(_, t))) if t == stamp));
    }

    #[test]
    fn resolving_aborts_an_expired_or_forced_transaction_and_fences_its_commit() {
        let mut s = Shard::new();
        s.run(lock(5, &[("p", true), ("q", true)])).unwrap();
        let resolve = |now_ms, abort_if_pending| TxnCommand::Resolve {
            txn: 5,
            primary: r("p"),
            now_ms,
            expires_ms: 1_000,
            abort_if_pending,
        };
        assert_eq!(s.run(resolve(999, false)), Ok(TxnReply::Status(Status::Pending)));
        assert_eq!(s.run(resolve(1_000, false)), Ok(TxnReply::Status(Status::Aborted)), "expired");
        assert_eq!(s.record("p").unwrap().lock(), None, "the primary's lock went with the abort");
        assert_eq!(s.run(resolve(0, false)), Ok(TxnReply::Status(Status::Aborted)), "the outcome stays");
        // The commit can no longer land, and a late lock of the primary is refused.
        let commit = TxnCommand::CommitPrimary {
            txn: 5,
            primary: r("p"),
            keys: vec![r("p")],
            writes: vec![w("p", 1, Some("1"))],
            now_ms: 0,
        };
        assert_eq!(s.run(commit), Ok(TxnReply::Status(Status::Aborted)));
        assert_eq!(s.run(lock(5, &[("p", true)])), Err(KvError::TxnAborted));
        // The secondary is rolled back by whoever met it.
        assert_eq!(s.run(TxnCommand::Rollback { txn: 5, keys: vec![r("q")] }), Ok(TxnReply::Done));
        assert_eq!(s.record("q"), None, "released; the key never existed");
        assert_eq!(s.put("q", "1"), Ok(1));

        // No lock and no outcome (the lock never landed): aborted now, for good.
        let never =
            TxnCommand::Resolve { txn: 6, primary: r("z"), now_ms: 0, expires_ms: 1_000, abort_if_pending: false };
        assert_eq!(s.run(never), Ok(TxnReply::Status(Status::Aborted)));
        assert_eq!(s.run(lock(6, &[("z", true)])), Err(KvError::TxnAborted));
        // Forced, while still valid.
        s.run(lock(9, &[("f", false)])).unwrap();
        let force =
            TxnCommand::Resolve { txn: 9, primary: r("f"), now_ms: 0, expires_ms: 1_000, abort_if_pending: true };
        assert_eq!(s.run(force), Ok(TxnReply::Status(Status::Aborted)));
    }

    /// The lock of a primary delayed past its transaction's abort (the
    /// abort found no lock there: a resolver met a secondary first), and
    /// past the time the abort is remembered, is still refused: otherwise
    /// the transaction could commit with a secondary rolled back under it.
    #[test]
    fn a_late_primary_lock_is_refused_after_its_abort_is_forgotten() {
        use crate::storage::txn_info::ABORTED_GRACE_MS;
        let mut s = Shard::new();
        let resolve = |txn, now_ms| TxnCommand::Resolve {
            txn,
            primary: r("p"),
            now_ms,
            expires_ms: 1_000 + txn as u64,
            abort_if_pending: false,
        };
        assert_eq!(s.run(resolve(1, 500)), Ok(TxnReply::Status(Status::Aborted)));
        // Much later another abort is recorded: the first one's is dropped.
        assert_eq!(s.run(resolve(2, 1_002 + ABORTED_GRACE_MS)), Ok(TxnReply::Status(Status::Aborted)));
        assert!(s.record("p").unwrap().txn.unwrap().outcome(1).is_none(), "dropped");
        let late = TxnCommand::Lock { txn: 1, primary: "p".into(), expires_ms: 1_001, keys: vec![(r("p"), true)] };
        assert_eq!(s.run(late), Err(KvError::TxnAborted));
        assert_eq!(s.record("p").unwrap().lock(), None);
        // A new transaction's lock is taken.
        let new = TxnCommand::Lock { txn: 3, primary: "p".into(), expires_ms: 9_000, keys: vec![(r("p"), true)] };
        assert!(matches!(s.run(new), Ok(TxnReply::Locked(..))));
    }

    /// A transaction that wrote nothing ends with a commit of no writes on
    /// its primary: it succeeds only while the primary's lock is still its
    /// own, and leaves no outcome behind.
    #[test]
    fn a_commit_without_writes_proves_the_locks_were_held() {
        let mut s = Shard::new();
        s.run(lock(4, &[("p", false), ("q", false)])).unwrap();
        let fence =
            |txn| TxnCommand::CommitPrimary { txn, primary: r("p"), keys: vec![r("p")], writes: vec![], now_ms: 0 };
        assert!(matches!(s.run(fence(4)), Ok(TxnReply::Status(Status::Committed(w, _))) if w.is_empty()));
        assert_eq!(s.record("p"), None, "released, nothing recorded, no tombstone left");
        assert!(s.record("q").unwrap().lock().is_some(), "the other keys are released by the coordinator");
        s.run(TxnCommand::Rollback { txn: 4, keys: vec![r("q")] }).unwrap();
        assert_eq!(s.record("q"), None, "locking an absent key leaves nothing once released");

        s.run(lock(5, &[("p", false)])).unwrap();
        let expired =
            TxnCommand::Resolve { txn: 5, primary: r("p"), now_ms: 2_000, expires_ms: 1_000, abort_if_pending: false };
        assert_eq!(s.run(expired), Ok(TxnReply::Status(Status::Aborted)));
        assert_eq!(
            s.run(fence(5)),
            Ok(TxnReply::Status(Status::Aborted)),
            "someone aborted it: its reads may be stale"
        );
    }

    /// A step that writes several keys of a range being split forwards
    /// them all, in the one forward entry of its log index (the forward log
    /// is keyed by index: an entry per key would keep only the last).
    #[test]
    fn a_step_writing_several_captured_keys_forwards_every_one() {
        use crate::command::ShardCommand;
        let mut s = Shard::new();
        s.index += 1;
        let begin = ShardCommand::BeginCapture { op_id: 5, start: "m".into(), end: None, target: 2 };
        crate::testing::step(&s.db, &mut s.state, s.index, begin).unwrap();
        s.run(lock(7, &[("a", true), ("n", true), ("p", false)])).unwrap();
        assert_eq!(crate::testing::forward_indexes(&s.db, 5), vec![s.index], "one entry for the step");
        let cf = crate::storage::cf(&s.db, crate::storage::CF_DATA);
        let stored = s.db.get_cf(cf, kv::forward_key(GROUP, 5, s.index)).unwrap().unwrap();
        let entry: kv::ForwardEntry = crate::codec::decode(&stored).unwrap();
        let keys: Vec<&str> = entry.records.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["n", "p"], "both captured keys, not the one outside the range");
        for r in &entry.records {
            assert_eq!(ValueRecord::decode(&r.record).unwrap().lock().unwrap().txn, 7);
        }
    }

    /// Bytes that are not a record stop the replica (a storage error),
    /// never read as an absent key: a lock silently dropped would let a
    /// writer through.
    #[test]
    fn an_undecodable_record_is_a_storage_error() {
        let mut s = Shard::new();
        let cf = crate::storage::cf(&s.db, crate::storage::CF_DATA);
        let mut bad = ValueRecord::live(1, b"1".to_vec())
            .with_txn(TxnInfo {
                lock: Some(Lock { txn: 1, primary: "k".into(), expires_ms: 1, write: true }),
                ..TxnInfo::default()
            })
            .encode();
        bad.truncate(12);
        s.db.put_cf(cf, crate::storage::data_key(GROUP, b"k"), &bad).unwrap();
        s.index += 1;
        let mut b = ApplyBatch::default();
        let got = apply(&s.db, GROUP, s.index, &mut s.state, &mut b, &lock(2, &[("k", true)]));
        assert!(got.is_err(), "a storage error, not {got:?}");
        assert!(kv::read(&s.db, GROUP, "k").is_err());
    }

    #[test]
    fn a_secondary_commit_skips_keys_already_finished() {
        let mut s = Shard::new();
        s.run(lock(3, &[("x", true), ("y", true)])).unwrap();
        let commit = TxnCommand::Commit { txn: 3, keys: vec![r("x"), r("y")], writes: vec![w("x", 1, Some("\"v\""))] };
        assert_eq!(s.run(commit.clone()), Ok(TxnReply::Done));
        assert_eq!(s.record("x").unwrap().version, 1);
        assert_eq!(s.record("y"), None, "locked, not written: released (it never existed)");
        s.put("x", "2").unwrap();
        assert_eq!(s.run(commit), Ok(TxnReply::Done));
        assert_eq!(s.record("x").unwrap().json, b"2", "a second commit does not write again");
    }

    #[test]
    fn one_phase_decides_and_writes_in_one_entry() {
        let mut s = Shard::new();
        s.put("acct/1", "100").unwrap();
        let txn = Txn {
            compare: vec![("acct/1".into(), 1), ("acct/9".into(), 0)],
            success: vec![
                Op::Put { key: "acct/1".into(), value: "90".into() },
                Op::Put { key: "acct/9".into(), value: "10".into() },
            ],
            failure: vec![Op::Get { key: "acct/1".into() }],
        };
        let keys = vec![r("acct/1"), r("acct/9")];
        let Ok(TxnReply::Decided(d)) = s.run(TxnCommand::OnePhase { keys: keys.clone(), txn: txn.clone() }) else {
            panic!()
        };
        assert!(d.succeeded);
        assert_eq!(s.record("acct/1").unwrap().json, b"90");
        assert_eq!(s.record("acct/9").unwrap().version, 1);
        let Ok(TxnReply::Decided(d)) = s.run(TxnCommand::OnePhase { keys, txn }) else { panic!() };
        assert!(!d.succeeded, "the versions moved on");
        assert_eq!(s.record("acct/1").unwrap().version, 2, "the failure branch only read");
    }

    #[test]
    fn steps_are_fenced_by_route_like_writes() {
        let mut s = Shard::new();
        let stale = Routed { key: "a".into(), range_id: 1, epoch: 0 };
        let cmd = TxnCommand::Lock { txn: 1, primary: "a".into(), expires_ms: 9, keys: vec![(stale, true)] };
        assert!(matches!(s.run(cmd), Err(KvError::WrongRange { .. })));
        assert_eq!(s.record("a"), None, "nothing locked");
    }
}
