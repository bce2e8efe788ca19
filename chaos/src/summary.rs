//! The summary of a run: the figures a human wants at a glance, and the same
//! as JSON (`--out`) for machines and for keeping.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::check::{CheckReport, Verdict};
use crate::history::{Op, OpCounts};
use crate::nemesis::NemesisReport;

/// Latency of successful operations, milliseconds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(ops: &[Op]) -> Latency {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds");
        for op in ops.iter().filter(|o| o.outcome.is_ok()) {
            let _ = h.record(((op.complete - op.invoke) / 1000).max(1));
        }
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Everything a run found.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// No anomaly, no undecided key, no crash, the cluster recovered, every
    /// operation ended and the final reads worked.
    pub valid: bool,
    /// Valid, invalid (a finding), or inconclusive (no finding, but the
    /// linearizability search could not decide some key: not a pass).
    pub verdict: Verdict,
    pub seed: u64,
    /// A command line that replays this run's schedule.
    pub replay: String,
    pub cluster: String,
    pub nemeses: Vec<String>,
    pub workloads: Vec<String>,
    /// Seconds of workload actually run.
    pub duration_s: f64,
    pub interrupted: bool,
    pub ops: OpCounts,
    pub ops_by_workload: BTreeMap<String, OpCounts>,
    pub ops_per_sec: f64,
    pub ok_per_sec: f64,
    pub latency_ms: Latency,
    pub faults: BTreeMap<String, u64>,
    pub nemesis: NemesisReport,
    /// Final phases of the splits/moves the nemesis started.
    pub operation_phases: BTreeMap<String, u64>,
    /// Seconds from the final heal until the cluster served again (`None`: it did not).
    pub recovery_s: Option<f64>,
    /// Why the set workload's final read could not be done, if it could not.
    pub final_read_error: Option<String>,
    /// Splits and moves the nemesis started that had not ended well after
    /// the final heal (`op_id phase`).
    #[serde(default)]
    pub stuck_operations: Vec<String>,
    pub anomalies: usize,
    pub lost_writes: usize,
    pub checks: CheckReport,
    pub run_dir: String,
    pub history_file: String,
}

impl Summary {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let verdict = match self.verdict {
            Verdict::Valid => "VALID",
            Verdict::Invalid => "INVALID",
            Verdict::Inconclusive => "INCONCLUSIVE (some register keys undecided: not a pass)",
        };
        let _ = writeln!(s, "== cleave-chaos: {verdict}  (seed {})", self.seed);
        let _ = writeln!(s, "cluster     {}", self.cluster);
        let _ =
            writeln!(s, "nemeses     {}", if self.nemeses.is_empty() { "none".into() } else { self.nemeses.join(",") });
        let _ = writeln!(s, "workloads   {}", self.workloads.join(","));
        let _ = writeln!(
            s,
            "ops         {} total: {} ok, {} failed, {} indeterminate in {:.1}s = {:.0} ops/s ({:.0} ok/s){}",
            self.ops.total,
            self.ops.ok,
            self.ops.failed,
            self.ops.indeterminate,
            self.duration_s,
            self.ops_per_sec,
            self.ok_per_sec,
            if self.interrupted { " [interrupted]" } else { "" }
        );
        for (w, c) in &self.ops_by_workload {
            let _ = writeln!(s, "  {w:<10}{} ok, {} failed, {} indeterminate", c.ok, c.failed, c.indeterminate);
        }
        let l = &self.latency_ms;
        let _ = writeln!(s, "latency ms  p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}", l.p50, l.p99, l.p999, l.max);
        let faults: Vec<String> = self.faults.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(s, "faults      {}", if faults.is_empty() { "none".into() } else { faults.join(", ") });
        if !self.operation_phases.is_empty() {
            let phases: Vec<String> = self.operation_phases.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(s, "operations  {}", phases.join(", "));
        }
        for w in &self.nemesis.warnings {
            let _ = writeln!(s, "warning     {w}");
        }
        match self.recovery_s {
            Some(r) => {
                let _ = writeln!(s, "recovery    {r:.1}s after the final heal");
            }
            None => {
                let _ = writeln!(s, "recovery    FAILED: the cluster did not serve again after the final heal");
            }
        }
        let r = &self.checks.register;
        let _ = writeln!(
            s,
            "register    {} keys: {} linearizable, {} violations, {} undecided",
            r.keys,
            r.linearizable,
            r.violations,
            r.unknown.len()
        );
        if let Some(set) = &self.checks.set {
            let _ = writeln!(
                s,
                "set         {} inserts, {} acknowledged; indeterminate: {} present, {} absent; lost {}, unexpected {}",
                set.attempted,
                set.acknowledged,
                set.indeterminate_present,
                set.indeterminate_absent,
                set.lost.len(),
                set.unexpected.len()
            );
        }
        if let Some(e) = &self.final_read_error {
            let _ = writeln!(s, "set         FINAL READ FAILED: {e}");
        }
        let scan = &self.checks.scan;
        if scan.inserts > 0 || scan.scans > 0 {
            let _ = writeln!(
                s,
                "scan        {} inserts, {} acknowledged; {} scans checked ({} pages); {} problems",
                scan.inserts,
                scan.acknowledged,
                scan.scans,
                scan.pages,
                scan.problems.len()
            );
        }
        if !self.stuck_operations.is_empty() {
            let _ = writeln!(s, "operations  STUCK after the final heal: {}", self.stuck_operations.join(", "));
        }
        let _ = writeln!(s, "monotonic   {} regressions", self.checks.monotonic_regressions);
        if let Some(bank) = &self.checks.bank {
            let _ = writeln!(
                s,
                "bank        {} transfers moved money; {} reads of every account checked, the final one included",
                bank.transfers, bank.reads
            );
        }
        for c in &self.nemesis.crashes {
            let _ = writeln!(s, "CRASH       node {} at {:.1}s: {}\n{}", c.node, c.at_s, c.status, c.log_tail);
        }
        let _ = writeln!(s, "anomalies   {}   lost writes {}", self.anomalies, self.lost_writes);
        for a in self.checks.anomalies.iter().take(10) {
            let _ = writeln!(s, "{}", a.describe());
        }
        if self.checks.anomalies.len() > 10 {
            let _ = writeln!(s, "… {} more in the JSON summary", self.checks.anomalies.len() - 10);
        }
        let _ = writeln!(s, "run dir     {} (history: {})", self.run_dir, self.history_file);
        let _ = writeln!(s, "replay      {}", self.replay);
        s
    }
}
