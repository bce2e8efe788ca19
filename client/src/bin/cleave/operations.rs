//! Text rendering of long-running operations (splits and replica moves) for
//! `cleave ops`, `cleave split` and `cleave move`: the
//! one-line-per-operation table, the detailed view with phase durations (and
//! a split's write pause), and the short progress message.
//!
//! A split (and a merge) walks `planned → created → capturing → frozen →
//! committed → done`, a move `planned → created → learning → joint → committed → done`; either
//! may end `aborted` before it commits (a move before `joint`). The server
//! reports how long each phase took and how far the copy got: for a split,
//! the keys backfilled into the new shard and the forwarded writes not yet
//! applied there; for a move, the new replica's size against the leader's
//! and the log entries it still lacks. Pure functions, so the layout is
//! tested without a cluster.

use cleave_client::{OpKind, OperationView, Phase, Progress, ShardId, META_GROUP};

use crate::format::{human_bytes, quoted, table, wire_name};

/// The `cleave ops` table.
pub fn ops_table(ops: &[OperationView]) -> String {
    let rows = ops
        .iter()
        .map(|v| {
            let op = &v.op;
            let (range, key, shards, reason) = match &op.kind {
                OpKind::Split { range_id, split_key, source, target, reason, .. } => {
                    (range_id.to_string(), quoted(split_key), format!("{source}->{target}"), reason)
                }
                OpKind::Merge { left_range, right_range, left, right, reason, .. } => {
                    (format!("{right_range}->{left_range}"), "-".into(), format!("{right}->{left}"), reason)
                }
                OpKind::Move { shard_id, from, to, reason } => (
                    "-".into(),
                    "-".into(),
                    format!("{}: node {}->{}", shard_label(*shard_id), from.node_id, to.node_id),
                    reason,
                ),
            };
            vec![
                op.op_id.to_string(),
                op.kind.name().into(),
                range,
                key,
                shards,
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
    let running = !op.phase.is_terminal() && op.progress.forward_backlog > 0;
    let mut out = match &op.kind {
        OpKind::Split { range_id, split_key, source, target, new_range_id, target_replicas, reason } => {
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
            if running {
                out.push(format!("  backlog:     {} forwarded writes", op.progress.forward_backlog));
            }
            out
        }
        OpKind::Merge { left_range, right_range, left, right, right_replicas, reason, .. } => {
            let nodes: Vec<String> = right_replicas.iter().map(|r| r.node_id.to_string()).collect();
            vec![
                format!("operation {}: merge range {right_range} into range {left_range}", op.op_id),
                format!("  shards:      shard {right} (nodes {}) into shard {left}", nodes.join(",")),
                format!("  reason:      {reason}"),
                format!("  phase:       {}", phase_label(v)),
                format!("  copied:      {}", copied(&op.progress)),
                format!("  write pause: {}", op.write_pause_ms.map_or("-".into(), |ms| format!("{ms}ms"))),
            ]
        }
        OpKind::Move { shard_id, from, to, reason } => {
            let mut out = vec![
                format!(
                    "operation {}: move {} from node {} to node {}",
                    op.op_id,
                    shard_label(*shard_id),
                    from.node_id,
                    to.node_id
                ),
                format!(
                    "  replicas:    {} on node {} -> {} on node {}",
                    from.replica_id, from.node_id, to.replica_id, to.node_id
                ),
                format!("  reason:      {reason}"),
                format!("  phase:       {}", phase_label(v)),
                format!("  copied:      {}", copied(&op.progress)),
            ];
            if running {
                out.push(format!("  backlog:     {}", entries_behind(op.progress.forward_backlog)));
            }
            out
        }
    };
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

/// The progress bar's message: the phase and, while copying, the keys (and
/// how far behind the new shard or replica is).
pub fn progress_message(v: &OperationView) -> String {
    let p = &v.op.progress;
    let mut notes = Vec::new();
    match (v.op.phase, &v.op.kind) {
        (Phase::Capturing, OpKind::Split { .. } | OpKind::Merge { .. }) if p.keys_total > 0 => {
            notes.push(format!("{}/{} keys", p.keys_copied, p.keys_total));
            if p.forward_backlog > 0 {
                notes.push(format!("backlog {}", p.forward_backlog));
            }
        }
        (Phase::Learning, OpKind::Move { .. }) => {
            if p.keys_total > 0 {
                notes.push(format!("{}/{} keys", p.keys_copied, p.keys_total));
            }
            if p.forward_backlog > 0 {
                notes.push(entries_behind(p.forward_backlog));
            }
        }
        _ => {}
    }
    if notes.is_empty() {
        phase_label(v)
    } else {
        format!("{} ({})", phase_label(v), notes.join(", "))
    }
}

/// `shard 3`, or `shard 0 (metadata)` for the metadata group.
pub fn shard_label(shard_id: ShardId) -> String {
    match shard_id {
        META_GROUP => format!("shard {shard_id} (metadata)"),
        _ => format!("shard {shard_id}"),
    }
}

/// A move's backlog: `5 entries behind`.
fn entries_behind(n: u64) -> String {
    format!("{n} {} behind", if n == 1 { "entry" } else { "entries" })
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
        let split = serde_json::json!({"split": {
            "range_id": 1, "split_key": "user5", "source": 1, "target": 4, "new_range_id": 9,
            "target_replicas": [{"replica_id": 11, "node_id": 1}, {"replica_id": 12, "node_id": 3}],
            "reason": "admin"}});
        view_of(split, phase, durations)
    }

    /// Shard 3's replica 7 on node 1 moving to node 4 as replica 21.
    fn move_view(phase: &str, durations: serde_json::Value) -> OperationView {
        let kind = serde_json::json!({"move": {
            "shard_id": 3, "from": {"replica_id": 7, "node_id": 1}, "to": {"replica_id": 21, "node_id": 4},
            "reason": "decommission"}});
        let mut v = view_of(kind, phase, durations);
        v.op.write_pause_ms = None;
        v
    }

    fn view_of(kind: serde_json::Value, phase: &str, durations: serde_json::Value) -> OperationView {
        serde_json::from_value(serde_json::json!({
            "op_id": 7,
            "kind": kind,
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

    #[test]
    fn moves_show_their_shard_nodes_and_copy_in_the_table() {
        let t = ops_table(&[view("done", serde_json::json!([])), move_view("learning", serde_json::json!([]))]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].starts_with("ID  KIND   RANGE  SPLIT KEY  SHARDS              PHASE"), "{t}");
        assert!(lines[2].starts_with("7   split  1      \"user5\"    1->4                done"), "{t}");
        assert!(
            lines[3].starts_with(
                "7   move   -      -          shard 3: node 1->4  learning  3.0MiB/6.0MiB (1000/2000 keys)  -"
            ),
            "{t}"
        );
        assert!(lines[3].ends_with("decommission"), "{t}");
    }

    #[test]
    fn move_details_name_both_replicas_and_the_backlog() {
        let d =
            details(&move_view("learning", serde_json::json!([["planned", 2], ["created", 40], ["learning", 900]])));
        assert!(d.starts_with("operation 7: move shard 3 from node 1 to node 4\n"), "{d}");
        assert!(d.contains("  replicas:    7 on node 1 -> 21 on node 4\n"), "{d}");
        assert!(d.contains("  reason:      decommission\n"), "{d}");
        assert!(d.contains("  copied:      3.0MiB/6.0MiB (1000/2000 keys)\n  backlog:     5 entries behind\n"), "{d}");
        assert!(!d.contains("write pause"), "moves do not pause writes: {d}");
        assert!(d.ends_with("learning  900ms\ntotal     942ms"), "{d}");
        let done = details(&move_view("done", serde_json::json!([])));
        assert!(!done.contains("backlog"), "{done}");
    }

    #[test]
    fn move_progress_counts_entries_behind_while_learning() {
        assert_eq!(
            progress_message(&move_view("learning", serde_json::json!([]))),
            "learning (1000/2000 keys, 5 entries behind)"
        );
        let mut v = move_view("learning", serde_json::json!([]));
        v.op.progress = Progress { forward_backlog: 1, ..Progress::default() };
        assert_eq!(progress_message(&v), "learning (1 entry behind)");
        v.op.progress.forward_backlog = 0;
        assert_eq!(progress_message(&v), "learning");
        assert_eq!(progress_message(&move_view("joint", serde_json::json!([]))), "joint");
        assert_eq!(progress_message(&move_view("capturing", serde_json::json!([]))), "capturing", "not a split");
        assert_eq!(shard_label(0), "shard 0 (metadata)");
    }
}
