//! What a stored record holds for transactions: a lock, and — on a
//! transaction's primary key — the outcomes of transactions whose other keys
//! may still be locked (see `docs/plans/transactions.md`).
//!
//! Both live inside the key's own [`super::ValueRecord`], not in a table of
//! their own, so that everything that moves records — a split's backfill and
//! forward log, a replica move, a Raft snapshot — moves a range's locks and
//! outcomes with it, with no path of their own to get wrong.

use serde::{Deserialize, Serialize};

/// A transaction's id: random, chosen by its coordinator.
pub type TxnId = u128;

/// A key held by a transaction until it commits or rolls back.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    pub txn: TxnId,
    /// The key whose shard decides the transaction's outcome.
    pub primary: String,
    /// Wall-clock milliseconds (the coordinator's) after which anyone who
    /// meets the lock may abort the transaction.
    pub expires_ms: u64,
    /// Whether the transaction may write this key: a lock taken only to
    /// read never hides a newer value from a reader.
    pub write: bool,
}

/// One write a committed transaction makes.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PendingWrite {
    pub key: String,
    /// The version the key gets: its stored version when it was locked,
    /// plus one (nothing else can write a locked key in between).
    pub version: u64,
    /// The new JSON text; `None` deletes the key.
    pub value: Option<String>,
}

/// How a transaction ended, as its primary key remembers it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub txn: TxnId,
    /// `Some(writes)`: committed with these writes (all shards' keys);
    /// `None`: aborted.
    pub committed: Option<Vec<PendingWrite>>,
    /// When the transaction's locks expire (its coordinator's clock): an
    /// aborted outcome is kept until a later step's clock is well past it.
    pub expires_ms: u64,
    /// A committed transaction's commit timestamp: every shard writes its
    /// keys' changes at it (`watch`). 0 in outcomes recorded before
    /// timestamps (read from [`LegacyTxnInfo`]).
    pub commit_ts: crate::clock::Ts,
}

/// [`TxnInfo`] as records stored it before outcomes had a commit
/// timestamp: read, never written.
#[derive(Deserialize)]
pub struct LegacyTxnInfo {
    lock: Option<Lock>,
    outcomes: Vec<LegacyOutcome>,
    dropped_through_ms: u64,
}

#[derive(Deserialize)]
struct LegacyOutcome {
    txn: TxnId,
    committed: Option<Vec<PendingWrite>>,
    expires_ms: u64,
}

impl From<LegacyTxnInfo> for TxnInfo {
    fn from(l: LegacyTxnInfo) -> TxnInfo {
        TxnInfo {
            lock: l.lock,
            outcomes: l
                .outcomes
                .into_iter()
                .map(|o| Outcome { txn: o.txn, committed: o.committed, expires_ms: o.expires_ms, commit_ts: 0 })
                .collect(),
            dropped_through_ms: l.dropped_through_ms,
        }
    }
}

/// How long past its locks' expiry an aborted outcome is kept.
pub const ABORTED_GRACE_MS: u64 = 5_000;

/// The most aborted outcomes one key keeps, whatever their age (the oldest
/// go first): a bound on the record's size.
pub const ABORTED_KEPT: usize = 256;

/// The transaction part of a record.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnInfo {
    pub lock: Option<Lock>,
    pub outcomes: Vec<Outcome>,
    /// The latest lock expiry of an aborted outcome dropped from this key.
    /// A lock of this key as a primary expiring no later is refused: its
    /// transaction may be one of those dropped, aborted already, whose
    /// lock step arrived late (a delayed or duplicated message).
    pub dropped_through_ms: u64,
}

impl TxnInfo {
    pub fn is_empty(&self) -> bool {
        self.lock.is_none() && self.outcomes.is_empty() && self.dropped_through_ms == 0
    }

    /// Whether this key, as the primary of `txn` whose locks expire at
    /// `expires_ms`, must refuse to be locked by it: `txn` has an outcome
    /// here already, or may have had one, dropped.
    pub fn refuses_primary_lock(&self, txn: TxnId, expires_ms: u64) -> bool {
        self.outcome(txn).is_some() || expires_ms <= self.dropped_through_ms
    }

    /// The recorded outcome of `txn`, if any.
    pub fn outcome(&self, txn: TxnId) -> Option<&Outcome> {
        self.outcomes.iter().find(|o| o.txn == txn)
    }

    /// Records `o` (replacing none: callers check [`TxnInfo::outcome`]
    /// first) at `now_ms` (the step's clock), dropping the aborted outcomes
    /// whose locks expired more than [`ABORTED_GRACE_MS`] before, and the
    /// oldest beyond [`ABORTED_KEPT`]. What is dropped raises
    /// `dropped_through_ms`, so a late lock of a dropped transaction is
    /// still refused. Deterministic: the clock comes with the step.
    pub fn record(&mut self, o: Outcome, now_ms: u64) {
        self.outcomes.push(o);
        let mut through = self.dropped_through_ms;
        self.outcomes.retain(|o| {
            let stale = o.committed.is_none() && o.expires_ms.saturating_add(ABORTED_GRACE_MS) < now_ms;
            if stale {
                through = through.max(o.expires_ms);
            }
            !stale
        });
        while self.outcomes.iter().filter(|o| o.committed.is_none()).count() > ABORTED_KEPT {
            let oldest = self.outcomes.iter().position(|o| o.committed.is_none()).expect("counted above");
            through = through.max(self.outcomes.remove(oldest).expires_ms);
        }
        self.dropped_through_ms = through;
    }

    /// Drops the outcome of `txn`.
    pub fn forget(&mut self, txn: TxnId) {
        self.outcomes.retain(|o| o.txn != txn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aborted(txn: TxnId, expires_ms: u64) -> Outcome {
        Outcome { txn, committed: None, expires_ms, commit_ts: 0 }
    }

    #[test]
    fn aborted_outcomes_are_bounded_and_committed_ones_kept() {
        let mut t = TxnInfo::default();
        t.record(Outcome { txn: 1, committed: Some(vec![]), expires_ms: 1, commit_ts: 5 }, 1);
        let n = ABORTED_KEPT as u128 + 20;
        for i in 2..2 + n {
            t.record(aborted(i, 1_000 + i as u64), 1_000);
        }
        assert!(t.outcome(1).is_some(), "a committed outcome stays until forgotten");
        assert_eq!(t.outcomes.len(), 1 + ABORTED_KEPT);
        assert!(t.outcome(2).is_none() && t.outcome(1 + n).is_some(), "the oldest aborted go first");
        assert_eq!(t.dropped_through_ms, 1_000 + 21, "the dropped ones' expiry is remembered");
        assert!(t.refuses_primary_lock(2, 1_002), "a dropped transaction's late lock is refused");
        assert!(t.refuses_primary_lock(30, 1_030), "an aborted one's too");
        assert!(!t.refuses_primary_lock(9_999, 5_000), "a new transaction's lock is not");
        t.forget(1);
        assert!(t.outcome(1).is_none());
    }

    #[test]
    fn aborted_outcomes_are_dropped_once_well_past_their_expiry() {
        let mut t = TxnInfo::default();
        t.record(aborted(1, 10_000), 7_000);
        t.record(aborted(2, 12_000), 10_000 + ABORTED_GRACE_MS);
        assert!(t.outcome(1).is_some(), "kept until the grace has passed");
        t.record(aborted(3, 20_000), 10_001 + ABORTED_GRACE_MS);
        assert!(t.outcome(1).is_none() && t.outcome(2).is_some() && t.outcome(3).is_some());
        assert_eq!(t.dropped_through_ms, 10_000);
        assert!(t.refuses_primary_lock(1, 10_000), "its late lock is refused");
        assert!(!t.refuses_primary_lock(4, 10_001));
    }
}
