//! What the workers measure: a latency histogram per operation type, error
//! counts by kind, and (for the split scenario) the completion time of every
//! successful write.
//!
//! Each worker owns a [`Recorder`], so recording is a plain memory write
//! with no lock; the recorders are merged when the run ends. HDR histograms
//! (High Dynamic Range, Gil Tene's design, the `hdrhistogram` crate) keep
//! every latency from 1 µs to an hour with 3 significant digits in a few
//! kilobytes, so p99.9 and the maximum are exact to 0.1% however many
//! requests were made. The only shared state is [`Live`], two atomic
//! counters read by the progress line.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;

use crate::workload::OpType;

/// Largest latency a histogram holds exactly (larger ones are clamped).
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A new empty latency histogram (microseconds).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// One successful write, for the pause analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Microseconds from the start of the run to the answer.
    pub at_us: u64,
    pub latency_us: u64,
}

/// One worker's measurements.
#[derive(Debug, Clone)]
pub struct Recorder {
    latency: [Histogram<u64>; 4],
    errors: [u64; 4],
    /// Errors by kind (`unavailable`, `http_503`, ...).
    pub error_kinds: BTreeMap<String, u64>,
    /// Reads that found no value.
    pub misses: u64,
    /// Transfers that changed nothing: a key moved on between their read
    /// and their write.
    pub conflicts: u64,
    /// Successful writes, when asked for.
    pub completions: Option<Vec<Completion>>,
}

impl Recorder {
    /// An empty recorder; with `keep_completions`, remembers every successful write.
    pub fn new(keep_completions: bool) -> Recorder {
        Recorder {
            latency: [histogram(), histogram(), histogram(), histogram()],
            errors: [0; 4],
            error_kinds: BTreeMap::new(),
            misses: 0,
            conflicts: 0,
            completions: keep_completions.then(Vec::new),
        }
    }

    /// A successful operation that took `latency_us` and answered at `at_us`.
    pub fn ok(&mut self, op: OpType, latency_us: u64, at_us: u64) {
        self.latency[op.index()].saturating_record(latency_us.max(1));
        if op == OpType::Update {
            if let Some(c) = &mut self.completions {
                c.push(Completion { at_us, latency_us });
            }
        }
    }

    /// A failed operation.
    pub fn error(&mut self, op: OpType, kind: &str) {
        self.errors[op.index()] += 1;
        *self.error_kinds.entry(kind.to_owned()).or_default() += 1;
    }

    pub fn latency(&self, op: OpType) -> &Histogram<u64> {
        &self.latency[op.index()]
    }

    pub fn errors(&self, op: OpType) -> u64 {
        self.errors[op.index()]
    }

    pub fn total_errors(&self) -> u64 {
        self.errors.iter().sum()
    }

    /// Adds `other`'s measurements to these.
    pub fn merge(&mut self, other: Recorder) {
        for op in OpType::ALL {
            self.latency[op.index()].add(&other.latency[op.index()]).expect("histograms with equal bounds");
            self.errors[op.index()] += other.errors[op.index()];
        }
        for (kind, n) in other.error_kinds {
            *self.error_kinds.entry(kind).or_default() += n;
        }
        self.misses += other.misses;
        self.conflicts += other.conflicts;
        if let (Some(mine), Some(theirs)) = (&mut self.completions, other.completions) {
            mine.extend(theirs);
        }
    }

    /// The completions in time order (merged recorders interleave).
    pub fn sorted_completions(&self) -> Vec<Completion> {
        let mut c = self.completions.clone().unwrap_or_default();
        c.sort_unstable_by_key(|c| c.at_us);
        c
    }
}

/// Counters shared by all workers, for the progress line.
#[derive(Debug, Default)]
pub struct Live {
    pub ops: AtomicU64,
    pub errors: AtomicU64,
}

impl Live {
    pub fn count(&self, ok: bool) {
        if ok {
            self.ops.fetch_add(1, Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `(successful ops, errors)` so far.
    pub fn read(&self) -> (u64, u64) {
        (self.ops.load(Ordering::Relaxed), self.errors.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorders_merge() {
        let mut a = Recorder::new(true);
        a.ok(OpType::Update, 100, 5);
        a.ok(OpType::Read, 50, 6);
        a.error(OpType::Update, "unavailable");
        let mut b = Recorder::new(true);
        b.ok(OpType::Update, 300, 2);
        b.error(OpType::Read, "unavailable");
        b.error(OpType::Read, "timeout");
        b.misses = 2;
        a.merge(b);
        assert_eq!(a.latency(OpType::Update).len(), 2);
        assert_eq!(a.latency(OpType::Update).max(), 300);
        assert_eq!((a.errors(OpType::Update), a.errors(OpType::Read), a.total_errors()), (1, 2, 3));
        assert_eq!(a.error_kinds.get("unavailable"), Some(&2));
        assert_eq!(a.misses, 2);
        let at: Vec<u64> = a.sorted_completions().iter().map(|c| c.at_us).collect();
        assert_eq!(at, [2, 5], "only writes, in time order");
        assert!(Recorder::new(false).sorted_completions().is_empty());
    }

    #[test]
    fn huge_latencies_are_clamped_not_lost() {
        let mut r = Recorder::new(false);
        r.ok(OpType::Scan, u64::MAX, 0);
        r.ok(OpType::Scan, 0, 0);
        assert_eq!(r.latency(OpType::Scan).len(), 2);
    }
}
