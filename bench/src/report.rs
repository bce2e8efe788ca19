//! The results of a workload run: summarised from the merged
//! [`Recorder`], printed as a table for people and written as JSON
//! (`--json FILE`) for scripts and plots. Both carry the same numbers.
//!
//! Throughput is successful operations per second of measured time (the
//! warmup excluded). Latencies are HDR histogram percentiles in
//! microseconds in JSON, and in the table with a unit that keeps them
//! readable (`850us`, `12.40ms`, `1.20s`).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::stats::{histogram, Recorder};
use crate::workload::OpType;

/// Latency percentiles of one operation type, in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    /// The percentiles of `h`; `None` if it recorded nothing.
    pub fn of(h: &Histogram<u64>) -> Option<Latency> {
        (!h.is_empty()).then(|| Latency {
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
        })
    }
}

/// One row of the results: an operation type, or the total.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpReport {
    pub op: String,
    /// Successful operations.
    pub count: u64,
    pub errors: u64,
    pub throughput_ops_s: f64,
    pub latency: Option<Latency>,
}

/// A whole workload run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// What was run: target, workload, distribution, sizes, concurrency...
    pub config: serde_json::Value,
    pub measured_s: f64,
    /// One row per operation type used, then `total`.
    pub ops: Vec<OpReport>,
    /// Reads that found no value (the key was never written).
    pub misses: u64,
    /// Transfers whose keys moved on between their read and their write.
    pub conflicts: u64,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
}

impl RunReport {
    /// Summarises `rec` over `measured_s` seconds.
    pub fn new(config: serde_json::Value, rec: &Recorder, measured_s: f64) -> RunReport {
        let mut ops = Vec::new();
        let mut total = histogram();
        let mut total_errors = 0;
        for op in OpType::ALL {
            let h = rec.latency(op);
            let errors = rec.errors(op);
            if h.is_empty() && errors == 0 {
                continue;
            }
            total.add(h).expect("histograms with equal bounds");
            total_errors += errors;
            ops.push(row(op.name(), h, errors, measured_s));
        }
        ops.push(row("total", &total, total_errors, measured_s));
        RunReport {
            config,
            measured_s,
            ops,
            misses: rec.misses,
            conflicts: rec.conflicts,
            errors: rec.error_kinds.clone(),
        }
    }

    /// The `total` row.
    pub fn total(&self) -> &OpReport {
        self.ops.last().expect("a report always has a total row")
    }

    /// The results as a table, with the error counts below it.
    pub fn render(&self) -> String {
        let mut out = latency_table(&self.ops);
        out.push('\n');
        if self.misses > 0 {
            out.push_str(&format!("reads of absent keys: {} (preload with --preload)\n", self.misses));
        }
        if self.conflicts > 0 {
            out.push_str(&format!("transfers that lost a race (a key moved on): {}\n", self.conflicts));
        }
        out.push_str(&format!("errors: {}", errors_line(&self.errors)));
        out
    }
}

fn row(name: &str, h: &Histogram<u64>, errors: u64, measured_s: f64) -> OpReport {
    let count = h.len();
    let throughput = if measured_s > 0.0 { count as f64 / measured_s } else { 0.0 };
    OpReport {
        op: name.to_owned(),
        count,
        errors,
        throughput_ops_s: (throughput * 10.0).round() / 10.0,
        latency: Latency::of(h),
    }
}

/// The percentile table: one row per operation type.
pub fn latency_table(rows: &[OpReport]) -> String {
    let headers = ["OP", "COUNT", "OPS/S", "P50", "P99", "P99.9", "MAX", "ERRORS"];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![r.op.clone(), r.count.to_string(), fmt_rate(r.throughput_ops_s)];
            row.extend(latency_cells(r.latency.as_ref()));
            row.push(r.errors.to_string());
            row
        })
        .collect();
    table(&headers, &cells)
}

/// The P50, P99, P99.9 and MAX cells of a table row (`-` without latencies).
pub fn latency_cells(l: Option<&Latency>) -> [String; 4] {
    match l {
        None => std::array::from_fn(|_| "-".into()),
        Some(l) => [l.p50_us, l.p99_us, l.p999_us, l.max_us].map(fmt_latency),
    }
}

/// A table: the first column left-aligned, the others right-aligned.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                s.push_str(&format!("{cell:<w$}"));
            } else {
                s.push_str(&format!("  {cell:>w$}"));
            }
        }
        s.trim_end().to_owned()
    };
    let mut out = vec![line(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>())];
    out.extend(rows.iter().map(|r| line(r)));
    out.join("\n")
}

/// A latency in microseconds with a readable unit.
pub fn fmt_latency(us: u64) -> String {
    if us < 1_000 {
        format!("{us}us")
    } else if us < 1_000_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

/// Operations per second: whole numbers, but a decimal below 100.
pub fn fmt_rate(ops_s: f64) -> String {
    if ops_s < 100.0 {
        format!("{ops_s:.1}")
    } else {
        format!("{ops_s:.0}")
    }
}

/// `none`, or `unavailable 3, timeout 1`.
pub fn errors_line(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    errors.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json<T: Serialize>(path: &std::path::Path, value: &T) -> anyhow::Result<()> {
    use anyhow::Context;
    let text = serde_json::to_string_pretty(value).context("encoding the report")?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_get_readable_units() {
        assert_eq!(fmt_latency(0), "0us");
        assert_eq!(fmt_latency(999), "999us");
        assert_eq!(fmt_latency(1_000), "1.00ms");
        assert_eq!(fmt_latency(12_345), "12.35ms");
        assert_eq!(fmt_latency(1_500_000), "1.50s");
    }

    #[test]
    fn table_aligns_numbers_right() {
        let t = table(&["OP", "N"], &[vec!["read".into(), "5".into()], vec!["total".into(), "1234".into()]]);
        assert_eq!(t, "OP        N\nread      5\ntotal  1234");
    }

    #[test]
    fn report_has_a_row_per_used_op_and_a_total() {
        let mut rec = Recorder::new(false);
        for us in 1..=1000 {
            rec.ok(OpType::Read, us, 0);
        }
        rec.ok(OpType::Update, 5000, 0);
        rec.error(OpType::Update, "unavailable");
        let r = RunReport::new(serde_json::json!({"workload": "a"}), &rec, 2.0);
        let names: Vec<&str> = r.ops.iter().map(|o| o.op.as_str()).collect();
        assert_eq!(names, ["read", "update", "total"], "scan was not used");
        let read = &r.ops[0];
        assert_eq!((read.count, read.errors, read.throughput_ops_s), (1000, 0, 500.0));
        let l = read.latency.as_ref().unwrap();
        assert_eq!((l.p50_us, l.p99_us, l.p999_us, l.max_us), (500, 990, 999, 1000));
        assert_eq!((r.total().count, r.total().errors), (1001, 1));
        assert_eq!(r.total().latency.as_ref().unwrap().max_us, 5003, "hdr keeps 3 significant digits");

        let text = r.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "OP      COUNT  OPS/S     P50     P99   P99.9     MAX  ERRORS");
        assert_eq!(lines[1], "read     1000    500   500us   990us   999us  1.00ms       0");
        assert_eq!(lines[2], "update      1    0.5  5.00ms  5.00ms  5.00ms  5.00ms       1");
        assert!(lines[3].starts_with("total    1001    500   501us"), "{text}");
        assert_eq!(lines[4], "errors: unavailable 1");

        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["ops"][0]["latency"]["p99_us"], 990);
        assert_eq!(json["errors"]["unavailable"], 1);
        assert_eq!(json["config"]["workload"], "a");
    }

    #[test]
    fn no_errors_reads_none() {
        assert_eq!(errors_line(&BTreeMap::new()), "none");
    }
}
