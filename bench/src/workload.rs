//! Workloads: which operation each request is.
//!
//! The mixes are YCSB's core workloads where they exist: A is update-heavy
//! (50% reads, 50% updates: a session store), B read-mostly (95/5: photo
//! tagging), C read-only (a cache). `write` is updates only, and `scan`
//! reads `--scan-len` consecutive keys from a random start (YCSB E without
//! its inserts). An update overwrites an existing key with a new value.
//! `sequential` inserts new keys in increasing order (timestamps,
//! auto-increment ids: every write lands at the end of the key space,
//! which splitting cannot spread; a hash-spread keyspace can).
//! `txn` is two-key transfers (CleaveDB only): a read-only transaction of
//! two keys, then one that moves 1 from one to the other if neither
//! changed in between — one shard or two, as the keys fall.

use clap::ValueEnum;
use serde::Serialize;

/// The operation types, each with its own latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpType {
    Read,
    Update,
    Scan,
    Txn,
}

impl OpType {
    pub const ALL: [OpType; 4] = [OpType::Read, OpType::Update, OpType::Scan, OpType::Txn];

    pub fn name(self) -> &'static str {
        match self {
            OpType::Read => "read",
            OpType::Update => "update",
            OpType::Scan => "scan",
            OpType::Txn => "txn",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A workload, chosen with `--workload`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// YCSB A: 50% reads, 50% updates.
    A,
    /// YCSB B: 95% reads, 5% updates.
    B,
    /// YCSB C: reads only.
    C,
    /// Updates only.
    Write,
    /// Scans of --scan-len keys from a random key.
    Scan,
    /// Two-key transfers through transactions (CleaveDB only).
    Txn,
    /// Inserts of new keys in increasing order.
    Sequential,
}

impl Workload {
    /// The share of reads, in `[0, 1]`; the rest are updates (or scans).
    pub fn read_share(self) -> f64 {
        match self {
            Workload::A => 0.5,
            Workload::B => 0.95,
            Workload::C => 1.0,
            Workload::Write | Workload::Scan | Workload::Txn | Workload::Sequential => 0.0,
        }
    }

    /// The operation for a uniform sample `u` in `[0, 1)`.
    pub fn pick(self, u: f64) -> OpType {
        match self {
            Workload::Scan => OpType::Scan,
            Workload::Txn => OpType::Txn,
            w if u < w.read_share() => OpType::Read,
            _ => OpType::Update,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix(w: Workload) -> [usize; 4] {
        let mut counts = [0; 4];
        for i in 0..1000 {
            counts[w.pick(i as f64 / 1000.0).index()] += 1;
        }
        counts
    }

    #[test]
    fn mixes_match_ycsb() {
        assert_eq!(mix(Workload::A), [500, 500, 0, 0]);
        assert_eq!(mix(Workload::B), [950, 50, 0, 0]);
        assert_eq!(mix(Workload::C), [1000, 0, 0, 0]);
        assert_eq!(mix(Workload::Write), [0, 1000, 0, 0]);
        assert_eq!(mix(Workload::Scan), [0, 0, 1000, 0]);
        assert_eq!(mix(Workload::Txn), [0, 0, 0, 1000]);
        assert_eq!(mix(Workload::Sequential), [0, 1000, 0, 0], "inserts are writes");
        assert_eq!(OpType::ALL.map(OpType::name), ["read", "update", "scan", "txn"]);
    }
}
