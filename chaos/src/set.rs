//! The set workload's checker: no lost writes, nothing from nowhere.
//!
//! Each insert is a create-only write (`if_version: 0`) of a fresh key, so
//! the expected final content is known exactly. After the faults are healed
//! the runner reads every key of the workload back (a scan of the whole key
//! space, filtered) and this checker compares:
//!
//! - an acknowledged insert must be present with its value: otherwise it is a
//!   **lost write** (the worst thing a database can do);
//! - an insert that certainly failed (refused, or a 409) must be absent;
//! - an indeterminate insert may be either (both are counted);
//! - a key nobody tried to insert must not exist.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::history::{Call, Op, Outcome, Ret};

/// A problem with one key of the set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SetProblem {
    pub key: String,
    /// What the final read found (`None`: absent).
    pub found: Option<u64>,
    /// The insert attempt(s) of this key, if any.
    pub inserts: Vec<Op>,
    pub message: String,
}

/// What the set checker found.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SetReport {
    pub attempted: u64,
    pub acknowledged: u64,
    /// Indeterminate inserts found present / absent at the end.
    pub indeterminate_present: u64,
    pub indeterminate_absent: u64,
    /// Acknowledged inserts missing (or with another value) at the end.
    pub lost: Vec<SetProblem>,
    /// Keys present that should not be.
    pub unexpected: Vec<SetProblem>,
}

/// Checks the inserts against the final content (`key → value`; a value that
/// is not one of ours is given as `u64::MAX`).
pub fn check_set(inserts: &[&Op], final_content: &BTreeMap<String, u64>) -> SetReport {
    let mut report = SetReport::default();
    let mut by_key: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in inserts {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (key, attempts) in &by_key {
        let found = final_content.get(*key).copied();
        let problem = |message: String| SetProblem {
            key: key.to_string(),
            found,
            inserts: attempts.iter().map(|o| (*o).clone()).collect(),
            message,
        };
        // This workload tries each key once; be general anyway.
        let acked: Vec<u64> = attempts
            .iter()
            .filter(|o| matches!(o.outcome, Outcome::Ok { ret: Ret::Written { .. } }))
            .filter_map(|o| value_of(o))
            .collect();
        let possible: Vec<u64> = attempts
            .iter()
            .filter(|o| o.outcome.is_indeterminate() || matches!(o.outcome, Outcome::Ok { ret: Ret::Written { .. } }))
            .filter_map(|o| value_of(o))
            .collect();
        report.attempted += attempts.len() as u64;
        report.acknowledged += acked.len() as u64;
        match found {
            None if !acked.is_empty() => {
                report.lost.push(problem("acknowledged insert is missing".into()));
            }
            None => {
                report.indeterminate_absent += attempts.iter().filter(|o| o.outcome.is_indeterminate()).count() as u64
            }
            Some(v) if !possible.contains(&v) => {
                let what = if acked.is_empty() {
                    "present although every insert of it failed"
                } else {
                    "acknowledged insert has another value"
                };
                let p = problem(format!("{what} (found {v})"));
                if acked.is_empty() {
                    report.unexpected.push(p);
                } else {
                    report.lost.push(p);
                }
            }
            Some(_) => {
                if acked.is_empty() {
                    report.indeterminate_present += 1;
                }
            }
        }
    }
    for (key, value) in final_content {
        if !by_key.contains_key(key.as_str()) {
            report.unexpected.push(SetProblem {
                key: key.clone(),
                found: Some(*value),
                inserts: Vec::new(),
                message: "present but never written".into(),
            });
        }
    }
    report.lost.sort_by(|a, b| a.key.cmp(&b.key));
    report.unexpected.sort_by(|a, b| a.key.cmp(&b.key));
    report
}

fn value_of(op: &Op) -> Option<u64> {
    match op.call {
        Call::Write { value } | Call::Cas { value, .. } => Some(value),
        Call::Read | Call::Delete | Call::CasDelete { .. } | Call::Scan | Call::ReadAll | Call::Transfer { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Workload;

    fn insert(key: &str, value: u64, outcome: Outcome) -> Op {
        Op {
            id: value,
            workload: Workload::Set,
            client: 0,
            key: key.into(),
            call: Call::Cas { expected: 0, value },
            invoke: value,
            complete: value + 1,
            outcome,
            node: String::new(),
            stale: false,
        }
    }

    fn content(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn everything_acknowledged_is_there() {
        let ops = [
            insert("a", 1, Outcome::ok(Ret::Written { version: 1 })),
            insert("b", 2, Outcome::Indeterminate { reason: "timeout".into() }),
            insert("c", 3, Outcome::Indeterminate { reason: "timeout".into() }),
            insert("d", 4, Outcome::Failed { reason: "503".into() }),
        ];
        let refs: Vec<&Op> = ops.iter().collect();
        let r = check_set(&refs, &content(&[("a", 1), ("b", 2)]));
        assert!(r.lost.is_empty() && r.unexpected.is_empty(), "{r:?}");
        assert_eq!((r.attempted, r.acknowledged, r.indeterminate_present, r.indeterminate_absent), (4, 1, 1, 1));
    }

    #[test]
    fn lost_write_is_caught() {
        let ops = [insert("a", 1, Outcome::ok(Ret::Written { version: 1 }))];
        let refs: Vec<&Op> = ops.iter().collect();
        let r = check_set(&refs, &content(&[]));
        assert_eq!(r.lost.len(), 1);
        assert_eq!(r.lost[0].key, "a");
        let r = check_set(&refs, &content(&[("a", 7)]));
        assert_eq!(r.lost.len(), 1, "wrong value counts as lost: {r:?}");
    }

    #[test]
    fn writes_from_nowhere_are_caught() {
        let ops = [
            insert("a", 1, Outcome::Failed { reason: "503".into() }),
            insert("b", 2, Outcome::ok(Ret::Conflict { current: Some(1) })),
        ];
        let refs: Vec<&Op> = ops.iter().collect();
        let r = check_set(&refs, &content(&[("a", 1), ("b", 2), ("z", 9)]));
        let keys: Vec<&str> = r.unexpected.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "z"]);
        assert!(r.lost.is_empty());
    }
}
