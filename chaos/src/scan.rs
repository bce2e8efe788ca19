//! The scan workload's checker: what a paginated scan must show while
//! ranges split and move under it.
//!
//! The workload inserts fresh keys (create-only, like the set workload,
//! spread over the whole key space) while a scanner reads the whole key
//! space again and again, page by page, following each page's `next`
//! cursor. Each page records its cursor, its `next`, its first and last key
//! and the workload's own keys with their values ([`PageRecord`]). For every
//! scan that completed, this checker demands:
//!
//! - **no missed key**: every insert acknowledged before the scan began is
//!   in it, with its value (a page is a linearizable read that started after
//!   the acknowledgement);
//! - **nothing from nowhere**: no key whose insert certainly failed (or was
//!   never attempted) appears, and no key shows a value other than the one
//!   its insert wrote;
//! - **order**: keys strictly ascending and unique over the whole scan
//!   (first and last key of consecutive pages included, so a key of any
//!   workload returned twice across a page boundary is caught too);
//! - **chained pages**: the first page starts at the scan's start, each
//!   next page at the previous page's `next`, every page's keys lie in
//!   `[start, next)`, and only the last page has no `next`.
//!
//! Inserts that are indeterminate, or acknowledged after the scan began,
//! may or may not appear.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::history::{Call, Op, Outcome, PageRecord, Ret};

/// One thing wrong with one scan.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ScanProblem {
    /// `scan_missing`, `scan_unexpected`, `scan_order` or `scan_chain`.
    pub kind: String,
    /// The key concerned (or the page's cursor).
    pub key: String,
    pub message: String,
    /// The scan, and the insert concerned if any.
    pub ops: Vec<Op>,
}

/// What the scan checker found.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    pub inserts: u64,
    pub acknowledged: u64,
    /// Scans that completed (and were checked), and their pages.
    pub scans: u64,
    pub pages: u64,
    pub problems: Vec<ScanProblem>,
}

/// Most problems reported per scan (one broken page can break many keys).
const MAX_PER_SCAN: usize = 10;

/// Checks the scan workload's operations: inserts and scans, any order.
pub fn check_scans(ops: &[&Op]) -> ScanReport {
    let mut report = ScanReport::default();
    let mut inserts: HashMap<&str, &Op> = HashMap::new();
    let mut scans: Vec<(&Op, &Vec<PageRecord>)> = Vec::new();
    for &op in ops {
        match (&op.call, &op.outcome) {
            (Call::Scan, Outcome::Ok { ret: Ret::Scanned { pages } }) => scans.push((op, pages)),
            (Call::Scan, _) => {}
            (Call::Cas { .. } | Call::Write { .. }, outcome) => {
                report.inserts += 1;
                if matches!(outcome, Outcome::Ok { ret: Ret::Written { .. } }) {
                    report.acknowledged += 1;
                }
                inserts.insert(op.key.as_str(), op);
            }
            _ => {}
        }
    }
    for (scan, pages) in scans {
        report.scans += 1;
        report.pages += pages.len() as u64;
        let mut problems = check_one(scan, pages, &inserts);
        problems.truncate(MAX_PER_SCAN);
        report.problems.extend(problems);
    }
    report
}

fn value_of(op: &Op) -> Option<u64> {
    match op.call {
        Call::Write { value } | Call::Cas { value, .. } => Some(value),
        _ => None,
    }
}

fn check_one(scan: &Op, pages: &[PageRecord], inserts: &HashMap<&str, &Op>) -> Vec<ScanProblem> {
    let mut problems = Vec::new();
    let problem = |kind: &str, key: &str, message: String, insert: Option<&Op>| ScanProblem {
        kind: kind.into(),
        key: key.to_string(),
        message,
        ops: std::iter::once(scan).chain(insert).cloned().collect(),
    };

    // Chained pages, keys inside their page, strict order across the scan.
    let mut expected_start = scan.key.clone();
    let mut previous: Option<&str> = None;
    for (i, page) in pages.iter().enumerate() {
        if page.start != expected_start {
            problems.push(problem(
                "scan_chain",
                &page.start,
                format!("page {i} starts at {:?}, the previous page said next = {expected_start:?}", page.start),
                None,
            ));
        }
        let last_page = i + 1 == pages.len();
        match (&page.next, last_page) {
            (Some(next), true) => problems.push(problem(
                "scan_chain",
                next,
                format!("the last page recorded still has next = {next:?}"),
                None,
            )),
            (None, false) => problems.push(problem(
                "scan_chain",
                &page.start,
                format!("page {i} has no next, yet more pages followed"),
                None,
            )),
            _ => {}
        }
        let keys = page.first.iter().chain(page.ours.iter().map(|(k, _)| k)).chain(page.last.iter());
        for k in keys {
            if k.as_str() < page.start.as_str() || page.next.as_ref().is_some_and(|n| k >= n) {
                problems.push(problem(
                    "scan_chain",
                    k,
                    format!("key {k:?} of page {i} is outside [{:?}, {:?})", page.start, page.next),
                    None,
                ));
            }
        }
        if page.items > 0 && (page.first.is_none() || page.last.is_none()) {
            problems.push(problem("scan_chain", &page.start, format!("page {i} has items but no first/last"), None));
        }
        if let (Some(prev), Some(first)) = (previous, page.first.as_deref()) {
            if first <= prev {
                problems.push(problem(
                    "scan_order",
                    first,
                    format!("page {i} begins with {first:?}, not after the previous page's last key {prev:?}"),
                    None,
                ));
            }
        }
        for pair in page.ours.windows(2) {
            if pair[1].0 <= pair[0].0 {
                problems.push(problem(
                    "scan_order",
                    &pair[1].0,
                    format!("page {i}: {:?} after {:?}: not strictly ascending", pair[1].0, pair[0].0),
                    None,
                ));
            }
        }
        if let Some(last) = page.last.as_deref() {
            previous = Some(last);
        }
        if let Some(next) = &page.next {
            expected_start = next.clone();
        }
    }

    // Every key seen (the scan's own keys), across pages.
    let mut seen: HashMap<&str, (usize, u64)> = HashMap::new();
    for (i, page) in pages.iter().enumerate() {
        for (k, v) in &page.ours {
            if let Some((j, _)) = seen.insert(k.as_str(), (i, *v)) {
                problems.push(problem("scan_order", k, format!("{k:?} returned twice (pages {j} and {i})"), None));
            }
        }
    }
    for (k, (i, v)) in &seen {
        match inserts.get(k) {
            None => problems.push(problem("scan_unexpected", k, format!("{k:?} (page {i}) was never inserted"), None)),
            Some(insert) => {
                let possible = insert.outcome.is_indeterminate()
                    || matches!(insert.outcome, Outcome::Ok { ret: Ret::Written { .. } });
                if !possible {
                    problems.push(problem(
                        "scan_unexpected",
                        k,
                        format!("{k:?} (page {i}) appears although its insert certainly failed"),
                        Some(insert),
                    ));
                } else if value_of(insert) != Some(*v) {
                    problems.push(problem(
                        "scan_unexpected",
                        k,
                        format!("{k:?} (page {i}) has value {v}, its insert wrote {:?}", value_of(insert)),
                        Some(insert),
                    ));
                }
            }
        }
    }
    let mut missing: Vec<&&Op> = inserts
        .values()
        .filter(|o| matches!(o.outcome, Outcome::Ok { ret: Ret::Written { .. } }) && o.complete < scan.invoke)
        .filter(|o| !seen.contains_key(o.key.as_str()))
        .collect();
    missing.sort_by_key(|o| o.key.as_str());
    for insert in missing {
        problems.push(problem(
            "scan_missing",
            &insert.key,
            format!("{:?}, acknowledged before the scan began, is not in it", insert.key),
            Some(insert),
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Workload;

    fn op(id: u64, key: &str, call: Call, invoke: u64, complete: u64, outcome: Outcome) -> Op {
        Op {
            id,
            workload: Workload::Scan,
            client: 1,
            key: key.into(),
            call,
            invoke,
            complete,
            outcome,
            node: String::new(),
            stale: false,
        }
    }

    fn insert(id: u64, key: &str, t: u64, outcome: Outcome) -> Op {
        op(id, key, Call::Cas { expected: 0, value: id }, t, t + 1, outcome)
    }

    fn acked() -> Outcome {
        Outcome::ok(Ret::Written { version: 1 })
    }

    fn page(start: &str, next: Option<&str>, keys: &[(&str, u64)]) -> PageRecord {
        PageRecord {
            start: start.into(),
            next: next.map(Into::into),
            items: keys.len() as u32,
            first: keys.first().map(|(k, _)| k.to_string()),
            last: keys.last().map(|(k, _)| k.to_string()),
            ours: keys.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    fn scan(invoke: u64, pages: Vec<PageRecord>) -> Op {
        op(100, "", Call::Scan, invoke, invoke + 50, Outcome::ok(Ret::Scanned { pages }))
    }

    fn kinds(ops: &[Op]) -> Vec<String> {
        let refs: Vec<&Op> = ops.iter().collect();
        check_scans(&refs).problems.into_iter().map(|p| p.kind).collect()
    }

    fn base() -> Vec<Op> {
        vec![
            insert(1, "a", 0, acked()),
            insert(2, "b", 0, acked()),
            insert(3, "c", 0, Outcome::Indeterminate { reason: "timeout".into() }),
            insert(4, "d", 0, Outcome::Failed { reason: "503".into() }),
            // acknowledged only after the scan began: may be missing
            insert(5, "e", 15, acked()),
        ]
    }

    #[test]
    fn a_chained_complete_scan_passes() {
        let mut ops = base();
        ops.push(scan(10, vec![page("", Some("b\0"), &[("a", 1), ("b", 2)]), page("b\0", None, &[("c", 3)])]));
        ops.push(scan(20, vec![page("", Some("a\0"), &[("a", 1)]), page("a\0", None, &[("b", 2), ("e", 5)])]));
        assert!(kinds(&ops).is_empty(), "{:?}", kinds(&ops));
        let refs: Vec<&Op> = ops.iter().collect();
        let r = check_scans(&refs);
        assert_eq!((r.inserts, r.acknowledged, r.scans, r.pages), (5, 3, 2, 4));
    }

    #[test]
    fn a_missed_acknowledged_key_is_caught() {
        let mut ops = base();
        ops.push(scan(10, vec![page("", Some("a\0"), &[("a", 1)]), page("a\0", None, &[])]));
        assert_eq!(kinds(&ops), ["scan_missing"]);
    }

    #[test]
    fn keys_from_failed_inserts_and_wrong_values_are_caught() {
        let mut ops = base();
        ops.push(scan(10, vec![page("", None, &[("a", 1), ("b", 2), ("d", 4), ("z", 9)])]));
        let mut k = kinds(&ops);
        k.sort();
        assert_eq!(k, ["scan_unexpected", "scan_unexpected"]);
        let mut ops = base();
        ops.push(scan(10, vec![page("", None, &[("a", 1), ("b", 7)])]));
        assert_eq!(kinds(&ops), ["scan_unexpected"]);
    }

    #[test]
    fn duplicates_and_disorder_are_caught() {
        let mut ops = base();
        ops.push(scan(10, vec![page("", Some("b\0"), &[("a", 1), ("b", 2)]), page("b\0", None, &[("b", 2)])]));
        let k = kinds(&ops);
        assert!(k.iter().all(|k| k == "scan_order" || k == "scan_chain"), "{k:?}");
        assert!(k.contains(&"scan_order".to_string()), "{k:?}");
        let mut ops = base();
        ops.push(scan(10, vec![page("", None, &[("b", 2), ("a", 1)])]));
        assert!(kinds(&ops).contains(&"scan_order".to_string()));
    }

    #[test]
    fn broken_chains_are_caught() {
        // the second page does not start at the first one's next
        let mut ops = base();
        ops.push(scan(10, vec![page("", Some("a\0"), &[("a", 1)]), page("c", None, &[("b", 2)])]));
        assert!(kinds(&ops).contains(&"scan_chain".to_string()), "{:?}", kinds(&ops));
        // a page with a next, but the scan stopped
        let mut ops = base();
        ops.push(scan(10, vec![page("", Some("b\0"), &[("a", 1), ("b", 2)])]));
        assert_eq!(kinds(&ops), ["scan_chain"]);
        // a key beyond the page's next
        let mut ops = base();
        ops.push(scan(10, vec![page("", Some("a\0"), &[("a", 1), ("b", 2)]), page("a\0", None, &[])]));
        assert!(kinds(&ops).contains(&"scan_chain".to_string()), "{:?}", kinds(&ops));
    }

    #[test]
    fn failed_scans_are_not_checked() {
        let mut ops = base();
        ops.push(op(100, "", Call::Scan, 10, 20, Outcome::Failed { reason: "503".into() }));
        let refs: Vec<&Op> = ops.iter().collect();
        let r = check_scans(&refs);
        assert_eq!((r.scans, r.problems.len()), (0, 0));
    }
}
