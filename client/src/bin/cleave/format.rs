//! Text rendering for the `cleave` CLI: item lines, the status tables and
//! the small helpers (aligned tables, byte sizes) the other views share.
//!
//! Text output is for people; `--output json` is for programs. Items print
//! as one tab-separated line `key  version  value` so they can still be cut
//! apart with standard tools. Pure functions, so the layout is tested
//! without a cluster.

use cleave_client::cleave_metadata::range::RangeState;
use cleave_client::{Item, NodeStatus, RangeDescriptor, ShardStatus, TxnResponse};
use serde::Serialize;

use crate::nodes::node_status;

/// `key<TAB>version<TAB>value` for one item.
pub fn item_line(item: &Item) -> String {
    format!("{}\t{}\t{}", item.key, item.version, item.value.get())
}

/// `succeeded` or `failed` (the branch that ran), then one line per result:
/// `key<TAB>version<TAB>value` for a get that found the key, `key<TAB>(not
/// found)` for one that did not, `key<TAB>version` for a put or delete.
pub fn txn_lines(r: &TxnResponse) -> String {
    let mut out = vec![if r.succeeded { "succeeded" } else { "failed" }.to_string()];
    for res in &r.results {
        out.push(match (&res.value, res.version, res.found) {
            (Some(v), Some(ver), _) => format!("{}\t{ver}\t{}", res.key, v.get()),
            (_, _, Some(false)) => format!("{}\t(not found)", res.key),
            (_, Some(ver), _) => format!("{}\t{ver}", res.key),
            _ => format!("{}\t?", res.key),
        });
    }
    out.join("\n")
}

/// The nodes, shards and ranges tables of `cleave status`. A node's status
/// is up, suspect, down or unknown while it is a member, then
/// decommissioning (with its liveness when not up) and removed.
pub fn status(nodes: &[NodeStatus], shards: &[ShardStatus], ranges: &[RangeDescriptor]) -> String {
    let node_rows = nodes
        .iter()
        .map(|n| {
            vec![
                n.id.to_string(),
                n.api_addr.clone().unwrap_or_else(|| "-".into()),
                n.raft_addr.clone(),
                node_status(n),
                n.last_heartbeat_ms.map_or("-".into(), |ms| format!("{ms}ms")),
                n.replicas.to_string(),
                n.leaders.to_string(),
            ]
        })
        .collect();
    let shard_rows = shards
        .iter()
        .map(|s| {
            let replicas: Vec<String> = s
                .replicas
                .iter()
                .map(|r| if Some(r.node_id) == s.leader { format!("{}*", r.node_id) } else { r.node_id.to_string() })
                .collect();
            vec![
                s.shard_id.to_string(),
                s.leader.map_or("none".into(), |l| l.to_string()),
                replicas.join(","),
                s.conf_version.to_string(),
                opt(s.keys),
                s.size_bytes.map_or("-".into(), human_bytes),
                s.qps.map_or("-".into(), |q| format!("{q:.1}")),
                opt(s.applied_index),
            ]
        })
        .collect();
    let range_rows = ranges
        .iter()
        .map(|r| {
            vec![
                r.range_id.to_string(),
                quoted(&r.start),
                r.end.as_deref().map_or("+inf".into(), quoted),
                r.shard_id.to_string(),
                r.epoch.to_string(),
                match &r.state {
                    RangeState::Active => "active".into(),
                    RangeState::Busy { op_id } => format!("busy (op {op_id})"),
                },
            ]
        })
        .collect();
    [
        format!("NODES ({})", nodes.len()),
        table(&["ID", "API", "RAFT", "STATUS", "HEARTBEAT", "REPLICAS", "LEADERS"], node_rows),
        String::new(),
        format!("SHARDS ({}; * = leader)", shards.len()),
        table(&["ID", "LEADER", "REPLICAS", "CONF", "KEYS", "SIZE", "QPS", "APPLIED"], shard_rows),
        String::new(),
        format!("RANGES ({})", ranges.len()),
        table(&["ID", "START", "END", "SHARD", "EPOCH", "STATE"], range_rows),
    ]
    .join("\n")
}

/// Left-aligned columns separated by two spaces, no trailing blanks.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(cell);
            s.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        s.trim_end().to_owned()
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

/// The snake_case name an enum has on the wire.
pub fn wire_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// A key as a JSON string literal, so empty and odd keys stay visible.
pub fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(&["ID", "NAME"], vec![vec!["10".into(), "a".into()], vec!["2".into(), "long name".into()]]);
        assert_eq!(t, "ID  NAME\n10  a\n2   long name");
    }

    #[test]
    fn status_marks_leaders_and_unbounded_ends() {
        // Built from JSON so optional fields added later default to None.
        let nodes: Vec<NodeStatus> = serde_json::from_value(serde_json::json!([{
            "id": 1, "raft_addr": "127.0.0.1:8001", "api_addr": "127.0.0.1:7001", "status": "up", "state": "active",
            "liveness": "up", "last_heartbeat_ms": 120, "replicas": 2, "leaders": 1
        }, {
            "id": 12, "raft_addr": "127.0.0.1:8012", "api_addr": null, "status": "decommissioning",
            "state": "decommissioning", "liveness": "down", "last_heartbeat_ms": 9000, "replicas": 1, "leaders": 0
        }]))
        .unwrap();
        let shards: Vec<ShardStatus> = serde_json::from_value(serde_json::json!([{
            "shard_id": 1, "leader": 2, "conf_version": 1, "size_bytes": 2048, "keys": 3, "qps": 12.25,
            "replicas": [{"replica_id": 4, "node_id": 1}, {"replica_id": 5, "node_id": 2}]
        }]))
        .unwrap();
        let ranges = vec![RangeDescriptor {
            range_id: 1,
            start: String::new(),
            end: None,
            shard_id: 1,
            epoch: 1,
            state: RangeState::Busy { op_id: 9 },
        }];
        let s = status(&nodes, &shards, &ranges);
        assert!(
            s.contains("ID  API             RAFT            STATUS                  HEARTBEAT  REPLICAS  LEADERS\n"),
            "{s}"
        );
        assert!(
            s.contains("1   127.0.0.1:7001  127.0.0.1:8001  up                      120ms      2         1\n"),
            "{s}"
        );
        assert!(
            s.contains("12  -               127.0.0.1:8012  decommissioning (down)  9000ms     1         0\n"),
            "{s}"
        );
        assert!(s.contains("1   2       1,2*"), "{s}");
        assert!(s.contains("2.0KiB  12.2"), "{s}");
        assert!(s.contains("1   \"\"     +inf  1      1      busy (op 9)"), "{s}");
    }

    #[test]
    fn items_print_as_tab_separated_lines() {
        let item: Item = serde_json::from_str(r#"{"key":"a/b","value":{"x": 1},"version":3}"#).unwrap();
        assert_eq!(item_line(&item), "a/b\t3\t{\"x\": 1}");
        assert_eq!(human_bytes(10), "10B");
    }
}
