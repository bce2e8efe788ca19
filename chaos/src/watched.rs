//! The watch checker: a watch over the whole key space ran through the
//! faults (through the Rust client, which reconnects from its last
//! cursor); every change it saw of this run's keys is checked against the
//! history.
//!
//! - every acknowledged write (put or delete through the single-key API)
//!   was seen, with its version: otherwise a **missed** change;
//! - no `(key, version)` was seen twice: a **duplicate**;
//! - a key's versions arrived in increasing order: else **out of order**;
//! - every change seen is of a key this run wrote: else **invented**.
//!
//! Transactions (the bank workload) report no versions, so their writes are
//! checked for order and duplicates only.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::history::{Call, Op, Outcome, Ret};

/// What the watcher saw: a changed key and its new version, in arrival order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub key: String,
    pub version: u64,
}

/// What the watch checker found.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchReport {
    pub seen: u64,
    pub acknowledged: u64,
    pub missed: Vec<Seen>,
    pub duplicates: Vec<Seen>,
    pub out_of_order: Vec<Seen>,
    pub invented: Vec<Seen>,
    /// The watch ended with an error (it must not).
    pub error: Option<String>,
}

impl WatchReport {
    pub fn is_clean(&self) -> bool {
        self.missed.is_empty()
            && self.duplicates.is_empty()
            && self.out_of_order.is_empty()
            && self.invented.is_empty()
            && self.error.is_none()
    }
}

/// Adds what `w` found to `checks`' anomalies.
pub fn add_anomalies(checks: &mut crate::check::CheckReport, w: &WatchReport) {
    let kinds = [
        ("watch_missed", &w.missed, "an acknowledged write never came through the watch"),
        ("watch_duplicate", &w.duplicates, "a change came through the watch twice"),
        ("watch_order", &w.out_of_order, "a key's versions came through the watch out of order"),
        ("watch_invented", &w.invented, "the watch showed a change of a key nobody wrote"),
    ];
    for (kind, list, what) in kinds {
        for s in list {
            checks.anomalies.push(crate::check::Anomaly {
                kind: kind.into(),
                workload: crate::history::Workload::Watch,
                key: s.key.clone(),
                message: format!("{what}: version {}", s.version),
                ops: Vec::new(),
            });
        }
    }
    if let Some(e) = &w.error {
        checks.anomalies.push(crate::check::Anomaly {
            kind: "watch_ended".into(),
            workload: crate::history::Workload::Watch,
            key: String::new(),
            message: format!("the watch ended: {e}"),
            ops: Vec::new(),
        });
    }
}

/// The acknowledged single-key writes of `ops`: `(key, version)`.
pub fn acknowledged(ops: &[Op]) -> HashSet<(String, u64)> {
    ops.iter()
        .filter(|o| matches!(o.call, Call::Write { .. } | Call::Cas { .. } | Call::Delete | Call::CasDelete { .. }))
        .filter_map(|o| match o.outcome {
            Outcome::Ok { ret: Ret::Written { version } } => Some((o.key.clone(), version)),
            _ => None,
        })
        .collect()
}

/// Checks what the watch saw (`seen`, in arrival order) against `ops`;
/// `written` says whether a key is one of this run's.
pub fn check(ops: &[Op], seen: &[Seen], written: impl Fn(&str) -> bool) -> WatchReport {
    let acked = acknowledged(ops);
    let mut report = WatchReport { seen: seen.len() as u64, acknowledged: acked.len() as u64, ..Default::default() };
    let mut got: HashSet<(String, u64)> = HashSet::new();
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    for s in seen {
        if !got.insert((s.key.clone(), s.version)) {
            report.duplicates.push(s.clone());
        }
        match last.insert(&s.key, s.version) {
            Some(before) if before >= s.version => report.out_of_order.push(s.clone()),
            _ => {}
        }
        if !written(&s.key) {
            report.invented.push(s.clone());
        }
    }
    let mut missed: Vec<Seen> =
        acked.difference(&got).map(|(key, version)| Seen { key: key.clone(), version: *version }).collect();
    missed.sort_by(|a, b| (&a.key, a.version).cmp(&(&b.key, b.version)));
    report.missed = missed;
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Workload;

    fn write(key: &str, version: Option<u64>) -> Op {
        let outcome = match version {
            Some(version) => Outcome::Ok { ret: Ret::Written { version } },
            None => Outcome::Failed { reason: "refused".into() },
        };
        Op {
            id: 0,
            workload: Workload::Register,
            client: 0,
            key: key.into(),
            call: Call::Write { value: 1 },
            invoke: 0,
            complete: 1,
            outcome,
            node: String::new(),
            stale: false,
        }
    }

    fn seen(key: &str, version: u64) -> Seen {
        Seen { key: key.into(), version }
    }

    #[test]
    fn a_clean_watch_passes_and_each_kind_of_fault_is_named() {
        let ops = vec![write("a", Some(1)), write("a", Some(2)), write("b", Some(1)), write("c", None)];
        let ours = |k: &str| ["a", "b", "c"].contains(&k);
        let clean = check(&ops, &[seen("a", 1), seen("b", 1), seen("a", 2)], ours);
        assert!(clean.is_clean(), "{clean:?}");
        let r = check(&ops, &[seen("a", 2), seen("a", 1), seen("a", 2), seen("z", 1)], ours);
        assert_eq!(r.missed, vec![seen("b", 1)]);
        assert_eq!(r.duplicates, vec![seen("a", 2)]);
        assert_eq!(r.out_of_order, vec![seen("a", 1)], "the second (a, 2) is a duplicate, not a regression");
        assert_eq!(r.invented, vec![seen("z", 1)]);
    }
}
