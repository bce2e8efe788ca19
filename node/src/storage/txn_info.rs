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
}

/// How many aborted outcomes one key keeps (the oldest go first). A
/// committed outcome stays until its transaction is forgotten.
pub const ABORTED_KEPT: usize = 16;

/// The transaction part of a record.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnInfo {
    pub lock: Option<Lock>,
    pub outcomes: Vec<Outcome>,
}

impl TxnInfo {
    pub fn is_empty(&self) -> bool {
        self.lock.is_none() && self.outcomes.is_empty()
    }

    /// The recorded outcome of `txn`, if any.
    pub fn outcome(&self, txn: TxnId) -> Option<&Outcome> {
        self.outcomes.iter().find(|o| o.txn == txn)
    }

    /// Records `o` (replacing none: callers check [`TxnInfo::outcome`]
    /// first), dropping the oldest aborted outcomes beyond [`ABORTED_KEPT`].
    pub fn record(&mut self, o: Outcome) {
        self.outcomes.push(o);
        while self.outcomes.iter().filter(|o| o.committed.is_none()).count() > ABORTED_KEPT {
            let oldest = self.outcomes.iter().position(|o| o.committed.is_none()).expect("counted above");
            self.outcomes.remove(oldest);
        }
    }

    /// Drops the outcome of `txn`.
    pub fn forget(&mut self, txn: TxnId) {
        self.outcomes.retain(|o| o.txn != txn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aborted_outcomes_are_bounded_and_committed_ones_kept() {
        let mut t = TxnInfo::default();
        t.record(Outcome { txn: 1, committed: Some(vec![]) });
        for i in 2..40 {
            t.record(Outcome { txn: i, committed: None });
        }
        assert!(t.outcome(1).is_some(), "a committed outcome stays until forgotten");
        assert_eq!(t.outcomes.len(), 1 + ABORTED_KEPT);
        assert!(t.outcome(2).is_none() && t.outcome(39).is_some(), "the oldest aborted go first");
        t.forget(1);
        assert!(t.outcome(1).is_none());
    }
}
