//! Checks a whole history: each workload's operations go to their checker,
//! and everything wrong comes back as a list of [`Anomaly`]s, each with the
//! operations that show it.
//!
//! Registers (the register and client workloads) are checked key by key
//! (linearizability is compositional: a history is linearizable iff each
//! key's sub-history is), which keeps each search small.
//!
//! A key whose search runs out of budget is *undecided*: it neither passed
//! nor failed, and a history with one is [`Verdict::Inconclusive`], never
//! valid.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bank::{check_bank, BankReport};
use crate::history::{Call, Op, Workload};
use crate::monotonic::check_monotonic;
use crate::register::{check_key, KeyVerdict};
use crate::scan::{check_scans, ScanReport};
use crate::set::{check_set, SetReport};

/// Default search budget per register key (memoized states).
pub const DEFAULT_MAX_STATES: usize = 2_000_000;

/// Something the database did wrong, with the evidence.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Anomaly {
    /// `nonlinearizable`, `lost_write`, `unexpected_write`, `version_regression`,
    /// `scan_missing`, `scan_unexpected`, `scan_order`, `scan_chain`.
    pub kind: String,
    pub workload: Workload,
    pub key: String,
    pub message: String,
    /// The offending sub-history.
    pub ops: Vec<Op>,
}

impl Anomaly {
    /// Several lines: the message, then one line per operation.
    pub fn describe(&self) -> String {
        let mut s = format!("[{}] {} key {:?}: {}", self.kind, self.workload.name(), self.key, self.message);
        for op in &self.ops {
            s.push_str("\n    ");
            s.push_str(&op.describe());
        }
        s
    }
}

/// Register figures.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct RegisterReport {
    pub keys: u64,
    pub linearizable: u64,
    pub violations: u64,
    /// Keys whose search ran out of budget (neither passed nor failed).
    pub unknown: Vec<String>,
}

/// Everything the checkers found.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub register: RegisterReport,
    pub set: Option<SetReport>,
    pub monotonic_regressions: u64,
    #[serde(default)]
    pub scan: ScanReport,
    /// The bank workload's figures, if it ran.
    #[serde(default)]
    pub bank: Option<BankReport>,
    /// The watch checker's figures, if it ran (`watched`).
    #[serde(default)]
    pub watch: Option<crate::watched::WatchReport>,
    pub anomalies: Vec<Anomaly>,
    /// Checks that ran but had nothing to decide on (a workload none of
    /// whose operations completed): the history has not passed them.
    #[serde(default)]
    pub unchecked: Vec<String>,
}

/// What a history amounts to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every check passed.
    Valid,
    /// Some check found an anomaly.
    #[default]
    Invalid,
    /// No anomaly found, but some register key could not be decided within
    /// the search budget: the history has *not* passed.
    Inconclusive,
}

impl CheckReport {
    /// Acknowledged writes that are gone.
    pub fn lost_writes(&self) -> usize {
        self.set.as_ref().map_or(0, |s| s.lost.len())
    }

    /// Keys whose search gave up.
    pub fn undecided(&self) -> usize {
        self.register.unknown.len() + self.unchecked.len()
    }

    /// Anomalies make the history invalid; otherwise an undecided key makes
    /// it inconclusive.
    pub fn verdict(&self) -> Verdict {
        if !self.anomalies.is_empty() {
            Verdict::Invalid
        } else if self.undecided() > 0 {
            Verdict::Inconclusive
        } else {
            Verdict::Valid
        }
    }
}

/// Checks `ops`. `set_content` is the final read of the set workload's keys
/// (`None` if the set workload did not run or could not be read back).
pub fn check_history(ops: &[Op], set_content: Option<&BTreeMap<String, u64>>, max_states: usize) -> CheckReport {
    let mut report = CheckReport::default();

    let mut registers: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    let mut workload_of: BTreeMap<&str, Workload> = BTreeMap::new();
    for op in ops.iter().filter(|o| o.workload.is_register()) {
        registers.entry(op.key.as_str()).or_default().push(op);
        workload_of.insert(op.key.as_str(), op.workload);
    }
    for (key, key_ops) in registers {
        report.register.keys += 1;
        match check_key(&key_ops, max_states) {
            KeyVerdict::Linearizable => report.register.linearizable += 1,
            KeyVerdict::Unknown { states } => {
                tracing::warn!("register {key:?}: search gave up after {states} states: undecided");
                report.register.unknown.push(key.to_string());
            }
            KeyVerdict::Violation { message, ops } => {
                report.register.violations += 1;
                report.anomalies.push(Anomaly {
                    kind: "nonlinearizable".into(),
                    workload: workload_of.get(key).copied().unwrap_or(Workload::Register),
                    key: key.to_string(),
                    message,
                    ops,
                });
            }
        }
    }

    let inserts: Vec<&Op> = ops.iter().filter(|o| o.workload == Workload::Set).collect();
    if let Some(content) = set_content {
        let set = check_set(&inserts, content);
        for (kind, problems) in [("lost_write", &set.lost), ("unexpected_write", &set.unexpected)] {
            for p in problems {
                report.anomalies.push(Anomaly {
                    kind: kind.into(),
                    workload: Workload::Set,
                    key: p.key.clone(),
                    message: format!("{} (final read: {:?})", p.message, p.found),
                    ops: p.inserts.clone(),
                });
            }
        }
        report.set = Some(set);
    }

    let scans: Vec<&Op> = ops.iter().filter(|o| o.workload == Workload::Scan).collect();
    report.scan = check_scans(&scans);
    let tried = scans.iter().filter(|o| matches!(o.call, Call::Scan)).count();
    if tried > 0 && report.scan.scans == 0 {
        report.unchecked.push(format!("scan: none of {tried} scans completed, so none was checked"));
    }
    for p in std::mem::take(&mut report.scan.problems) {
        report.anomalies.push(Anomaly {
            kind: p.kind.clone(),
            workload: Workload::Scan,
            key: p.key.clone(),
            message: p.message.clone(),
            ops: p.ops.clone(),
        });
        report.scan.problems.push(p);
    }

    let bank: Vec<&Op> = ops.iter().filter(|o| o.workload == Workload::Bank).collect();
    if !bank.is_empty() {
        let mut b = check_bank(&bank);
        if b.reads == 0 {
            report.unchecked.push("bank: no read of every account was answered, not even the final one".into());
        }
        for op in std::mem::take(&mut b.wrong) {
            report.anomalies.push(Anomaly {
                kind: "bank_total".into(),
                workload: Workload::Bank,
                key: op.key.clone(),
                message: "a transaction reading every account saw money made or lost (or an account missing)".into(),
                ops: vec![op],
            });
        }
        report.bank = Some(b);
    }

    let mono: Vec<&Op> = ops.iter().filter(|o| o.workload == Workload::Monotonic && !o.stale).collect();
    let regressions = check_monotonic(&mono);
    report.monotonic_regressions = regressions.len() as u64;
    for r in regressions {
        report.anomalies.push(Anomaly {
            kind: "version_regression".into(),
            workload: Workload::Monotonic,
            key: r.key.clone(),
            message: format!("client {} saw the version go down", r.client),
            ops: vec![r.earlier, r.later],
        });
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Call, Outcome, Ret};

    fn op(id: u64, workload: Workload, key: &str, call: Call, t: u64, ret: Ret) -> Op {
        Op {
            id,
            workload,
            client: id as u32,
            key: key.into(),
            call,
            invoke: t,
            complete: t + 1,
            outcome: Outcome::ok(ret),
            node: String::new(),
            stale: false,
        }
    }

    #[test]
    fn each_workload_reports_its_anomalies() {
        let ops = vec![
            op(1, Workload::Register, "r1", Call::Write { value: 1 }, 0, Ret::Written { version: 1 }),
            op(2, Workload::Register, "r1", Call::Read, 5, Ret::NotFound),
            op(3, Workload::Register, "r2", Call::Read, 5, Ret::NotFound),
            op(4, Workload::Set, "s1", Call::Cas { expected: 0, value: 4 }, 0, Ret::Written { version: 1 }),
            op(5, Workload::Monotonic, "m", Call::Read, 0, Ret::Value { value: 9, version: 2 }),
            Op { client: 5, ..op(6, Workload::Monotonic, "m", Call::Read, 3, Ret::Value { value: 8, version: 1 }) },
        ];
        let report = check_history(&ops, Some(&BTreeMap::new()), 1000);
        let kinds: Vec<&str> = report.anomalies.iter().map(|a| a.kind.as_str()).collect();
        assert_eq!(kinds, ["nonlinearizable", "lost_write", "version_regression"]);
        assert_eq!(report.register, RegisterReport { keys: 2, linearizable: 1, violations: 1, unknown: vec![] });
        assert_eq!(report.lost_writes(), 1);
        assert!(report.anomalies[0].describe().contains("r1"));
        assert_eq!(report.verdict(), Verdict::Invalid);
    }

    #[test]
    fn an_undecided_key_makes_the_history_inconclusive_never_valid() {
        // The linearizability search's own hard case: many indeterminate
        // writes, then a read of a value nobody wrote. Invalid, but with a
        // small budget the search gives up before it can tell.
        let mut ops: Vec<Op> = (0..12)
            .map(|i| Op {
                outcome: Outcome::Indeterminate { reason: "timeout".into() },
                ..op(i + 1, Workload::Register, "r", Call::Write { value: i + 1 }, 0, Ret::NotFound)
            })
            .collect();
        ops.push(op(13, Workload::Register, "r", Call::Read, 1, Ret::Value { value: 99, version: 1 }));
        let report = check_history(&ops, None, 50);
        assert_eq!(report.register.unknown, ["r"]);
        assert!(report.anomalies.is_empty());
        assert_ne!(report.verdict(), Verdict::Valid);
        assert_eq!(report.verdict(), Verdict::Inconclusive);
        // With enough budget it is found invalid.
        assert_eq!(check_history(&ops, None, 1_000_000).verdict(), Verdict::Invalid);
        // The same for the client workload's registers.
        let client: Vec<Op> = ops.iter().map(|o| Op { workload: Workload::Client, ..o.clone() }).collect();
        assert_eq!(check_history(&client, None, 50).verdict(), Verdict::Inconclusive);
        let found = check_history(&client, None, 1_000_000);
        assert_eq!(found.anomalies[0].workload, Workload::Client);
    }

    #[test]
    fn a_scan_workload_none_of_whose_scans_completed_has_not_passed() {
        let failed = |id| Op {
            outcome: Outcome::Failed { reason: "413 on a cursor".into() },
            ..op(id, Workload::Scan, "", Call::Scan, id, Ret::NotFound)
        };
        let ops = vec![
            op(1, Workload::Scan, "s1", Call::Write { value: 1 }, 0, Ret::Written { version: 1 }),
            failed(2),
            failed(3),
        ];
        let report = check_history(&ops, None, 1000);
        assert!(report.anomalies.is_empty());
        assert_eq!(report.verdict(), Verdict::Inconclusive, "{:?}", report.unchecked);
        // Without any scan attempted there is nothing to hold against it.
        assert_eq!(check_history(&ops[..1], None, 1000).verdict(), Verdict::Valid);
    }
}
