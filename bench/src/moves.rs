//! The `move` scenario: move a loaded shard's replica to another node while
//! writers hammer the shard, and measure what the writers saw.
//!
//! Fill the shard holding keys `user00000000…` with `--fill-mb`, write
//! continuously, then `POST /admin/move` its replica on `--from` (default:
//! the node leading the shard, so the leadership has to move too) to `--to`
//! (default: the live node holding no replica of it and the fewest
//! replicas overall) and follow the move to the end (the machinery shared
//! with `split` is in [`crate::under_writes`]). Besides what the writers
//! saw, the report has the move time (the server's `planned` to `done`, and
//! the client's request to seeing it done), the bytes moved (the shard's
//! size: a new replica receives all of it, by snapshot or log), the rate
//! over the `learning` phase, and the leader and replica nodes before and
//! after.

use anyhow::{bail, Context, Result};
use cleave_client::{Client, NodeCondition, NodeId, NodeStatus, OpKind, OperationView, Phase, ShardStatus};
use serde::Serialize;

use crate::under_writes::{self, mib_per_s, phase_ms, phase_name, Load, OpRun, Settings};

/// Everything the scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct MoveReport {
    #[serde(flatten)]
    pub run: OpRun,
    pub shard_id: u64,
    pub range_id: u64,
    pub from_node: NodeId,
    pub to_node: NodeId,
    pub leader_before: Option<NodeId>,
    pub leader_after: Option<NodeId>,
    /// Nodes holding a replica of the shard before and after.
    pub nodes_before: Vec<NodeId>,
    pub nodes_after: Vec<NodeId>,
    /// The shard's size just before the move (its leader's report): what the
    /// new replica had to receive.
    pub shard_bytes: u64,
    pub shard_keys: Option<u64>,
    /// The new replica's own size report when it had caught up.
    pub new_replica_bytes: u64,
    /// Planned to done, from the server's phase durations.
    pub move_ms: u64,
    /// `shard_bytes` over the `learning` phase.
    pub learning_mib_per_s: Option<f64>,
}

impl MoveReport {
    /// Whether the run is a success: the move finished and no write failed.
    pub fn ok(&self) -> bool {
        self.run.ok()
    }
}

/// Runs the scenario against the cluster behind `client`.
pub async fn run(
    client: Client,
    s: &Settings,
    from: Option<NodeId>,
    to: Option<NodeId>,
    config: serde_json::Value,
) -> Result<MoveReport> {
    client.health().await.context("the cluster does not answer")?;
    let load = Load::new(&client, s);
    let range = load.home_range(&client).await?;
    load.fill(&client, s, &range).await?;
    let shard_id = range.shard_id;
    let before = shard(&client, shard_id).await?;
    let nodes = client.nodes().await.context("listing the nodes")?;
    let (from, to) = pick_nodes(&before, &nodes, from, to)?;
    eprintln!(
        "moving shard {shard_id} ({} MiB, leader {}) from node {from} to node {to}",
        before.size_bytes.unwrap_or(0) >> 20,
        before.leader.map_or("unknown".into(), |l| l.to_string())
    );
    let run = load
        .measure(&client, s, config, "move", async { Ok(client.move_replica(shard_id, from, to).await?) }, phase_note)
        .await?;
    let view = &run.operation;
    if !matches!(view.op.kind, OpKind::Move { .. }) {
        bail!("operation {} is a {}, not a move", view.op.op_id, view.op.kind.name());
    }
    let after = shard(&client, shard_id).await.ok();
    let shard_bytes = before.size_bytes.unwrap_or(0);
    Ok(MoveReport {
        shard_id,
        range_id: range.range_id,
        from_node: from,
        to_node: to,
        leader_before: before.leader,
        leader_after: after.as_ref().and_then(|a| a.leader),
        nodes_before: replica_nodes(&before),
        nodes_after: after.as_ref().map(replica_nodes).unwrap_or_default(),
        shard_bytes,
        shard_keys: before.keys,
        new_replica_bytes: view.op.progress.bytes_copied,
        move_ms: move_ms(view),
        learning_mib_per_s: phase_ms(view, Phase::Learning).and_then(|ms| mib_per_s(shard_bytes, ms)),
        run,
    })
}

async fn shard(client: &Client, shard_id: u64) -> Result<ShardStatus> {
    let shards = client.shards().await.context("listing the shards")?;
    shards.into_iter().find(|s| s.shard_id == shard_id).with_context(|| format!("no shard {shard_id}"))
}

fn replica_nodes(s: &ShardStatus) -> Vec<NodeId> {
    let mut nodes: Vec<NodeId> = s.replicas.iter().map(|r| r.node_id).collect();
    nodes.sort_unstable();
    nodes
}

/// The move's source and target: `from` defaults to the shard's leader,
/// `to` to the live node without a replica of it that holds the fewest
/// replicas (the lowest id among equals).
pub fn pick_nodes(
    shard: &ShardStatus,
    nodes: &[NodeStatus],
    from: Option<NodeId>,
    to: Option<NodeId>,
) -> Result<(NodeId, NodeId)> {
    let holders = replica_nodes(shard);
    let id = shard.shard_id;
    let from = match from.or(shard.leader) {
        Some(f) => f,
        None => bail!("shard {id} has no known leader; name the source with --from"),
    };
    if !holders.contains(&from) {
        bail!("node {from} holds no replica of shard {id} (its replicas are on nodes {holders:?})");
    }
    let to = match to {
        Some(t) if holders.contains(&t) => bail!("node {t} already holds a replica of shard {id}"),
        Some(t) if !nodes.iter().any(|n| n.id == t) => bail!("there is no node {t}"),
        Some(t) => t,
        None => nodes
            .iter()
            .filter(|n| n.status == NodeCondition::Up && !holders.contains(&n.id))
            .min_by_key(|n| (n.replicas, n.id))
            .map(|n| n.id)
            .with_context(|| {
                format!("every live node holds a replica of shard {id}; add a node or name the target with --to")
            })?,
    };
    Ok((from, to))
}

/// Planned to done, in milliseconds of the server's clock.
pub fn move_ms(v: &OperationView) -> u64 {
    v.phase_durations_ms.iter().map(|(_, ms)| ms).sum()
}

/// The phase and, while the new replica catches up, how far it has got.
fn phase_note(v: &OperationView) -> String {
    let p = &v.op.progress;
    match v.op.phase {
        Phase::Learning if p.bytes_total > 1 => format!(
            "learning {} of {} MiB, {} entries behind",
            p.bytes_copied >> 20,
            p.bytes_total >> 20,
            p.forward_backlog
        ),
        ph => phase_name(ph),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The report as text.
pub fn render(r: &MoveReport) -> String {
    let op = &r.run.operation.op;
    let node = |n: Option<NodeId>| n.map_or("?".into(), |n| n.to_string());
    let header = format!(
        "move op {} of shard {} (range {}) from node {} to node {}: {}",
        op.op_id,
        r.shard_id,
        r.range_id,
        r.from_node,
        r.to_node,
        phase_name(op.phase)
    );
    let details = [
        format!(
            "  move time:     {:.2}s (server, planned to done); {:.2}s from the request to seeing it done",
            r.move_ms as f64 / 1e3,
            r.run.client_op_s
        ),
        format!(
            "  moved:         {}{} (the shard's size before the move){}; {}",
            mib(r.shard_bytes),
            r.shard_keys.map(|k| format!(", {k} keys")).unwrap_or_default(),
            r.learning_mib_per_s.map(|m| format!(", {m:.1} MiB/s over the learning phase")).unwrap_or_default(),
            match r.new_replica_bytes {
                // Sizes come with node heartbeats (every second); a short
                // move can end before the new replica has sent one.
                0 => "the new replica had not reported its size yet".to_string(),
                b => format!("the new replica reported {}", mib(b)),
            }
        ),
        format!(
            "  leader:        node {} -> node {}; replicas on nodes {:?} -> {:?}",
            node(r.leader_before),
            node(r.leader_after),
            r.nodes_before,
            r.nodes_after
        ),
    ];
    under_writes::render(&r.run, "move", header, &details, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::under_writes::tests::{move_view, op_run};

    fn shard_on(nodes: &[NodeId], leader: Option<NodeId>) -> ShardStatus {
        serde_json::from_value(serde_json::json!({
            "shard_id": 1, "leader": leader, "conf_version": 1,
            "replicas": nodes.iter().map(|n| serde_json::json!({"replica_id": 10 + n, "node_id": n})).collect::<Vec<_>>(),
            "size_bytes": null, "keys": null, "qps": null, "applied_index": null,
        }))
        .unwrap()
    }

    fn node(id: NodeId, status: &str, replicas: usize) -> NodeStatus {
        serde_json::from_value(serde_json::json!({
            "id": id, "raft_addr": "127.0.0.1:1", "api_addr": null, "status": status, "state": "active",
            "liveness": "up", "last_heartbeat_ms": 10, "replicas": replicas, "leaders": 0,
        }))
        .unwrap()
    }

    #[test]
    fn the_move_leaves_the_leader_for_the_emptiest_live_node() {
        let s = shard_on(&[1, 2, 3], Some(2));
        let nodes = [
            node(1, "up", 2),
            node(2, "up", 2),
            node(3, "up", 2),
            node(4, "down", 0),
            node(5, "up", 3),
            node(6, "up", 1),
        ];
        assert_eq!(pick_nodes(&s, &nodes, None, None).unwrap(), (2, 6), "4 is down, 6 holds fewer than 5");
        assert_eq!(pick_nodes(&s, &nodes, Some(3), Some(5)).unwrap(), (3, 5));
        assert_eq!(pick_nodes(&s, &nodes[..5], Some(1), None).unwrap(), (1, 5));
    }

    #[test]
    fn impossible_moves_are_refused() {
        let s = shard_on(&[1, 2, 3], None);
        let nodes = [node(1, "up", 1), node(2, "up", 1), node(3, "up", 1), node(4, "up", 0)];
        let err = |from, to| pick_nodes(&s, &nodes, from, to).unwrap_err().to_string();
        assert!(err(None, None).contains("no known leader"), "{}", err(None, None));
        assert!(err(Some(4), None).contains("node 4 holds no replica of shard 1"));
        assert!(err(Some(1), Some(2)).contains("node 2 already holds"));
        assert!(err(Some(1), Some(9)).contains("there is no node 9"));
        assert!(pick_nodes(&s, &nodes[..3], Some(1), None).unwrap_err().to_string().contains("every live node"));
    }

    #[test]
    fn move_time_is_the_sum_of_the_phases() {
        assert_eq!(move_ms(&move_view()), 2400);
    }

    #[test]
    fn report_renders_the_key_figures() {
        let r = MoveReport {
            run: op_run(move_view()),
            shard_id: 1,
            range_id: 1,
            from_node: 1,
            to_node: 4,
            leader_before: Some(1),
            leader_after: Some(2),
            nodes_before: vec![1, 2, 3],
            nodes_after: vec![2, 3, 4],
            shard_bytes: 120 << 20,
            shard_keys: Some(120_000),
            new_replica_bytes: 118 << 20,
            move_ms: 2400,
            learning_mib_per_s: Some(60.0),
        };
        let text = render(&r);
        assert!(text.starts_with("move op 3 of shard 1 (range 1) from node 1 to node 4: done\n"), "{text}");
        assert!(text.contains("move time:     2.40s (server, planned to done); 2.50s from the request"), "{text}");
        assert!(
            text.contains("moved:         120.0 MiB, 120000 keys (the shard's size before the move), 60.0 MiB/s over the learning phase; the new replica reported 118.0 MiB"),
            "{text}"
        );
        assert!(text.contains("leader:        node 1 -> node 2; replicas on nodes [1, 2, 3] -> [2, 3, 4]"), "{text}");
        let unreported = render(&MoveReport { new_replica_bytes: 0, ..r.clone() });
        assert!(unreported.contains("; the new replica had not reported its size yet\n"), "{unreported}");
        assert!(text.contains("longest gap while the move ran"), "{text}");
        assert!(text.ends_with("RESULT: ok"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!((json["move_ms"].as_u64(), json["windows"][0]["writes"].as_u64()), (Some(2400), Some(10)));
        assert_eq!(json["operation"]["phase_durations_ms"][2], serde_json::json!(["learning", 2000]));
    }
}
