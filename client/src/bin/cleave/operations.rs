//! Text rendering of long-running operations (splits) for `cleave ops` and
//! `cleave split`: the one-line-per-operation table, the detailed view with
//! phase durations and the write pause, and the short progress message.
//!
//! An operation walks `planned → created → capturing → frozen → committed →
//! done` (or ends `aborted`); the server reports how long each phase took and,
//! once known, how long writes to the moving keys were paused. Pure
//! functions, so the layout is tested without a cluster.

use cleave_client::{OpKind, OperationView, Phase, Progress};

use crate::format::{human_bytes, quoted, table, wire_name};

/// The `cleave ops` table.
pub fn ops_table(ops: &[OperationView]) -> String {
    let rows = ops
        .iter()
        .map(|v| {
            let op = &v.op;
            let OpKind::Split { range_id, split_key, source, target, reason, .. } = &op.kind;
            vec![
                op.op_id.to_string(),
                "split".into(),
                range_id.to_string(),
                quoted(split_key),
                format!("{source}->{target}"),
                phase_label(v),
                copied(&op.progress),
                op.write_pause_ms.map_or("-".into(), |ms| format!("{ms}ms")),
                reason.clone(),
                op.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let headers = ["ID", "KIND", "RANGE", "SPLIT KEY", "SHARDS", "PHASE", "COPIED", "PAUSE", "REASON", "ERROR"];
    format!("OPERATIONS ({})\n{}", ops.len(), table(&headers, rows))
}

/// The detailed view of one operation.
pub fn details(v: &OperationView) -> String {
    let op = &v.op;
    let OpKind::Split { range_id, split_key, source, target, new_range_id, target_replicas, reason } = &op.kind;
    let replicas: Vec<String> = target_replicas.iter().map(|r| r.node_id.to_string()).collect();
    let mut out = vec![
        format!("operation {}: split range {range_id} at {}", op.op_id, quoted(split_key)),
        format!(
            "  moves to:    shard {target} (nodes {}) as range {new_range_id}, from shard {source}",
            replicas.join(",")
        ),
        format!("  reason:      {reason}"),
        format!("  phase:       {}", phase_label(v)),
        format!("  copied:      {}", copied(&op.progress)),
        format!("  write pause: {}", op.write_pause_ms.map_or("-".into(), |ms| format!("{ms}ms"))),
    ];
    if op.progress.forward_backlog > 0 && !op.phase.is_terminal() {
        out.push(format!("  backlog:     {} forwarded writes", op.progress.forward_backlog));
    }
    if let Some(e) = &op.error {
        out.push(format!("  error:       {e}"));
    }
    out.push(String::new());
    out.push(phase_table(v));
    out.join("\n")
}

/// Milliseconds spent in each phase, and the total.
pub fn phase_table(v: &OperationView) -> String {
    let mut rows: Vec<Vec<String>> =
        v.phase_durations_ms.iter().map(|(p, ms)| vec![wire_name(p), format!("{ms}ms")]).collect();
    let total: u64 = v.phase_durations_ms.iter().map(|(_, ms)| ms).sum();
    rows.push(vec!["total".into(), format!("{total}ms")]);
    table(&["PHASE", "TIME"], rows)
}

/// The progress bar's message: the phase and, while copying, the keys.
pub fn progress_message(v: &OperationView) -> String {
    let p = &v.op.progress;
    match v.op.phase {
        Phase::Capturing if p.keys_total > 0 => {
            let mut s = format!("capturing ({}/{} keys", p.keys_copied, p.keys_total);
            if p.forward_backlog > 0 {
                s.push_str(&format!(", backlog {}", p.forward_backlog));
            }
            s.push(')');
            s
        }
        _ => phase_label(v),
    }
}

/// The phase, with `cleaned` noted on aborted operations.
fn phase_label(v: &OperationView) -> String {
    let name = wire_name(&v.op.phase);
    match v.op.phase {
        Phase::Aborted if v.op.cleaned => format!("{name} (cleaned)"),
        _ => name,
    }
}

/// `3.0MiB/6.0MiB (1000/2000 keys)`, or `-` before the copy starts.
fn copied(p: &Progress) -> String {
    if p.keys_total == 0 && p.keys_copied == 0 {
        return "-".into();
    }
    format!("{}/{} ({}/{} keys)", human_bytes(p.bytes_copied), human_bytes(p.bytes_total), p.keys_copied, p.keys_total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(phase: &str, durations: serde_json::Value) -> OperationView {
        serde_json::from_value(serde_json::json!({
            "op_id": 7,
            "kind": {"split": {"range_id": 1, "split_key": "user5", "source": 1, "target": 4, "new_range_id": 9,
                               "target_replicas": [{"replica_id": 11, "node_id": 1}, {"replica_id": 12, "node_id": 3}],
                               "reason": "admin"}},
            "phase": phase,
            "history": [["planned", 1000]],
            "progress": {"keys_copied": 1000, "bytes_copied": 3145728, "keys_total": 2000, "bytes_total": 6291456,
                         "forward_backlog": 5},
            "write_pause_ms": if phase == "done" { serde_json::json!(12) } else { serde_json::Value::Null },
            "error": if phase == "aborted" { serde_json::json!("cancelled by request") } else { serde_json::Value::Null },
            "cleaned": phase == "aborted",
            "phase_durations_ms": durations,
        }))
        .unwrap()
    }

    #[test]
    fn table_has_one_row_per_operation() {
        let t = ops_table(&[view("done", serde_json::json!([])), view("aborted", serde_json::json!([]))]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "OPERATIONS (2)");
        assert!(lines[1].starts_with("ID  KIND   RANGE  SPLIT KEY  SHARDS  PHASE"), "{t}");
        assert!(lines[2].contains("\"user5\"    1->4    done"), "{t}");
        assert!(lines[2].contains("3.0MiB/6.0MiB (1000/2000 keys)  12ms   admin"), "{t}");
        assert!(lines[3].contains("aborted (cleaned)") && lines[3].ends_with("cancelled by request"), "{t}");
    }

    #[test]
    fn details_list_phase_durations_and_pause() {
        let d = details(&view("done", serde_json::json!([["planned", 3], ["capturing", 1500], ["frozen", 9]])));
        assert!(d.starts_with("operation 7: split range 1 at \"user5\"\n"), "{d}");
        assert!(d.contains("shard 4 (nodes 1,3) as range 9, from shard 1"), "{d}");
        assert!(d.contains("write pause: 12ms"), "{d}");
        assert!(!d.contains("backlog"), "finished operations have no backlog line: {d}");
        assert!(
            d.contains("PHASE      TIME\nplanned    3ms\ncapturing  1500ms\nfrozen     9ms\ntotal      1512ms"),
            "{d}"
        );
    }

    #[test]
    fn progress_message_shows_keys_while_capturing() {
        assert_eq!(
            progress_message(&view("capturing", serde_json::json!([]))),
            "capturing (1000/2000 keys, backlog 5)"
        );
        assert_eq!(progress_message(&view("frozen", serde_json::json!([]))), "frozen");
        assert_eq!(progress_message(&view("aborted", serde_json::json!([]))), "aborted (cleaned)");
    }
}
