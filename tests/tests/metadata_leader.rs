//! The metadata leader's duties under faults (issue 24), on real node
//! processes:
//! - a metadata leader cut off from the other metadata replicas (a fault
//!   point drops its group-0 Raft traffic, nothing else) does not answer
//!   heartbeats with its frozen directory, so a node restarted meanwhile
//!   does not collect a replica the new leader placed on it;
//! - a move whose new replica dies before the joint configuration is
//!   entered ends (and `POST /admin/transfer-leader` is refused meanwhile);
//! - a node that leads the metadata group again does not judge liveness
//!   from what it heard in its previous term;
//! - a node restarted on another RPC port is replicated to again;
//! - a node that does not host the metadata group finds it after a restart
//!   once the founding nodes are gone.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cleave_tests::ops::{admin_post, describe, start_op, wait_ended, wait_phase};
use cleave_tests::{
    free_ports, secs, wait_for, Cluster, ClusterOpts, ErrorCode, ExtraNode, NodeCondition, NodeId, Phase, ShardId,
    FIRST_SHARD,
};
use serde_json::{json, Value};

const META: ShardId = 0;

fn opts(args: &[&str]) -> ClusterOpts {
    ClusterOpts { extra_args: args.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

/// `/admin/directory` from the first of `bases` that answers.
async fn directory_via(c: &Cluster, bases: &[String]) -> Value {
    wait_for(secs(20), "/admin/directory to answer", || async {
        for b in bases {
            if let Ok(r) = c.http.get_path(b, "/admin/directory").await {
                if r.status == 200 {
                    return Some(r.value());
                }
            }
        }
        None
    })
    .await
}

async fn directory(c: &Cluster) -> Value {
    let bases: Vec<String> = c.up_ids().into_iter().map(|id| c.api(id)).collect();
    directory_via(c, &bases).await
}

/// Nodes of `group`'s replicas in directory `dir`.
fn replica_nodes_in(dir: &Value, group: ShardId) -> Vec<NodeId> {
    let g = if group == META { &dir["meta"] } else { &dir["shards"][group.to_string()] };
    let mut v: Vec<NodeId> =
        g["replicas"].as_array().map(|a| a.iter().filter_map(|r| r["node_id"].as_u64()).collect()).unwrap_or_default();
    v.sort();
    v
}

/// Whether node `id` has a replica of `group` open (its metrics name it).
async fn holds(c: &Cluster, id: NodeId, group: ShardId) -> bool {
    !c.metric_lines(id, &format!("cleave_raft_is_leader{{group=\"{group}\"}}")).await.is_empty()
}

/// Whether node `id` says it leads `group`.
async fn leads(c: &Cluster, id: NodeId, group: ShardId) -> bool {
    c.metric(id, &format!("cleave_raft_is_leader{{group=\"{group}\"}}")).await == 1.0
}

async fn start_move(c: &Cluster, via: NodeId, shard: ShardId, from: NodeId, to: NodeId) -> u64 {
    start_op(c, via, "/admin/move", json!({"shard_id": shard, "from_node": from, "to_node": to})).await
}

/// Writes `key` through `base`, retrying transient answers.
async fn put_retry(c: &Cluster, base: &str, key: &str, value: Value) {
    wait_for(secs(30), format_args!("PUT {key} through {base} to succeed"), || async {
        let r = c.http.put(base, key, &value, None).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await
}

/// Cuts (or restores) node `id`'s metadata-group Raft traffic.
async fn isolate_meta(c: &Cluster, id: NodeId, isolated: bool) {
    let r = admin_post(c, id, "/admin/fault/isolate-meta", &json!({ "isolated": isolated })).await;
    assert_eq!(r.status, 200, "{r:?}");
}

/// Checks that every voter in every shard leader's voter set is on a node
/// that holds the shard's group.
async fn assert_voters_hold_their_groups(c: &Cluster) {
    let dir = directory(c).await;
    let mut node_of: BTreeMap<u64, NodeId> = BTreeMap::new();
    for g in dir["shards"].as_object().into_iter().flat_map(|m| m.values()).chain(std::iter::once(&dir["meta"])) {
        for r in g["replicas"].as_array().into_iter().flatten() {
            node_of.insert(r["replica_id"].as_u64().unwrap(), r["node_id"].as_u64().unwrap());
        }
    }
    for op in dir["ops"].as_object().into_iter().flat_map(|m| m.values()) {
        if let Some(to) = op["kind"]["move"]["to"].as_object() {
            node_of.insert(to["replica_id"].as_u64().unwrap(), to["node_id"].as_u64().unwrap());
        }
    }
    let shards = wait_for(secs(30), "every shard to report its leader's voters", || async {
        let s = c.http.admin_shards(&c.api(c.up_ids()[0])).await.ok()?;
        s.iter().all(|s| s.raft_voters.is_some()).then_some(s)
    })
    .await;
    for s in shards {
        for voter in s.raft_voters.iter().flatten().flatten() {
            let node =
                node_of.get(voter).copied().unwrap_or_else(|| panic!("voter {voter} of shard {} unknown", s.shard_id));
            assert!(
                holds(c, node, s.shard_id).await,
                "voter {voter} of shard {} lives on node {node}, which does not hold the group",
                s.shard_id
            );
        }
    }
}

// ---------------------------------------------------------------------------

/// Issue 24.1. The interleaving: the metadata leader L1 loses its quorum;
/// L2 is elected and places a replica r of shard 1 on node 4 (a move);
/// node 4 is killed and restarted and its first heartbeat goes to L1
/// (the first seed). L1 must not answer with its frozen directory (which
/// does not list r), or node 4 collects r, a current voter, ten seconds
/// later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_leader_cut_off_from_its_quorum_does_not_act() {
    let c = Cluster::start(5, opts(&["--node-dead-after", "10", "--balance", "false", "--fault-api", "true"])).await;
    let l1 = c.wait_for_group_leader(META, None, secs(10)).await;
    isolate_meta(&c, l1, true).await;
    let l2 = wait_for(secs(30), "another node to lead the metadata group", || async {
        for id in c.up_ids().into_iter().filter(|id| *id != l1) {
            if leads(&c, id, META).await {
                return Some(id);
            }
        }
        None
    })
    .await;
    eprintln!("metadata leader {l1} cut off; node {l2} leads the metadata group");
    let dir = directory_via(&c, &[c.api(l2)]).await;
    let from = replica_nodes_in(&dir, FIRST_SHARD).into_iter().find(|n| *n != l1 && *n != 4).expect("a source");
    let op = start_move(&c, l2, FIRST_SHARD, from, 4).await;
    let v = wait_ended(&c, op, secs(60)).await;
    assert_eq!(v.op.phase, Phase::Done, "{}", describe(&v));
    assert!(holds(&c, 4, FIRST_SHARD).await);
    put_retry(&c, &c.api(l2), "after-move", json!(1)).await;

    c.kill(4);
    c.restart_and_wait(4).await;
    // Longer than replica GC's grace period: node 4 keeps its replica.
    let until = Instant::now() + secs(20);
    while Instant::now() < until {
        assert!(holds(&c, 4, FIRST_SHARD).await, "node 4 deleted its replica of shard {FIRST_SHARD}, a voter");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    isolate_meta(&c, l1, false).await;
    put_retry(&c, &c.api(l1), "after-heal", json!(2)).await;
    assert_voters_hold_their_groups(&c).await;
}

/// Issue 24.2 and 24.6 (transfer-leader during a move). A move held in
/// `Joint` before its joint configuration is entered loses its target for
/// good; the shard takes ≥ 100 writes and its leadership moves: the move
/// must still end (aborted) within two minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_whose_target_dies_before_the_joint_configuration_ends() {
    let c = Cluster::start(4, opts(&["--balance", "false", "--fault-hold", "enter_joint=6000"])).await;
    let leader = c.wait_for_group_leader(FIRST_SHARD, None, secs(10)).await;
    let from = (1..=3).find(|n| *n != leader).expect("a follower");
    let op = start_move(&c, 1, FIRST_SHARD, from, 4).await;
    wait_phase(&c, op, Phase::Joint, secs(30)).await;

    // The move's driver moves leadership itself: an admin transfer now is refused.
    let r = admin_post(&c, 1, "/admin/transfer-leader", &json!({"shard_id": FIRST_SHARD, "to_node": from})).await;
    let e = r.expect_error(409, ErrorCode::VersionConflict);
    assert!(e.error.message.contains("busy"), "{r:?}");

    c.kill(4);
    let alive = c.up_ids()[0];
    for i in 0..120 {
        put_retry(&c, &c.api(alive), &format!("w/{i:03}"), json!(i)).await;
    }
    let sl = c.wait_for_group_leader(FIRST_SHARD, None, secs(10)).await;
    c.kill(sl);
    c.restart_and_wait(sl).await;
    let t = Instant::now();
    let v = wait_ended(&c, op, secs(120)).await;
    eprintln!("move ended {:?} after the shard's leadership moved: {}", t.elapsed(), describe(&v));
    assert_eq!(v.op.phase, Phase::Aborted, "{}", describe(&v));
    assert_eq!(replica_nodes_in(&directory(&c).await, FIRST_SHARD), vec![1, 2, 3]);
    put_retry(&c, &c.api(alive), "after", json!(1)).await;
}

/// Issue 24.3. Leadership of the metadata group leaves node L for 8 s and
/// comes back: L must not count the 8 s as silence of every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_leading_the_metadata_group_again_does_not_heal_healthy_nodes() {
    let c = Cluster::start(4, opts(&["--node-dead-after", "5", "--balance", "false"])).await;
    let l = c.wait_for_group_leader(META, None, secs(10)).await;
    let dir = directory(&c).await;
    let other = replica_nodes_in(&dir, META).into_iter().find(|n| *n != l).expect("another metadata replica");
    let r = admin_post(&c, other, "/admin/transfer-leader", &json!({"shard_id": META, "to_node": other})).await;
    assert_eq!(r.status, 200, "{r:?}");
    c.wait_for_group_leader(META, Some(l), secs(10)).await;
    // The scenario itself: away for longer than --node-dead-after.
    tokio::time::sleep(secs(8)).await;
    let r = admin_post(&c, other, "/admin/transfer-leader", &json!({"shard_id": META, "to_node": l})).await;
    assert_eq!(r.status, 200, "{r:?}");
    let until = Instant::now() + secs(5);
    while Instant::now() < until {
        let ops = c.http.admin_operations(&c.api(l)).await.unwrap_or_default();
        let heals: Vec<String> = ops.iter().filter(|o| describe(o).contains("heal")).map(describe).collect();
        assert!(heals.is_empty(), "healthy nodes healed after the leadership came back: {heals:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Issue 24.4. Node 3 comes back on another RPC port: its replicas must be
/// replicated to again (each group back to three live replicas).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_on_another_rpc_port_is_replicated_to_again() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let initial: Vec<String> = (1..=3).map(|i| format!("{i}={}", c.node(i).raft_addr())).collect();
    c.kill(3);
    let port = free_ports(1)[0];
    let n3 = c.node(3);
    let args: Vec<String> = [
        "--id",
        "3",
        "--data-dir",
        &n3.data_dir.display().to_string(),
        "--listen-api",
        &n3.api_addr(),
        "--listen-raft",
        &format!("127.0.0.1:{port}"),
        "--initial-cluster",
        &initial.join(","),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let moved = ExtraNode::start(&args, c.dir().join("node3-moved.log"));
    let base = n3.api();
    wait_for(secs(30), "node 3 to answer /health on its API", || async {
        (c.http.health(&base).await.ok()?.status == 200).then_some(())
    })
    .await;
    // Node 3 must not lead shard 1 (a leader reaches the others anyway).
    wait_for(secs(30), "shard 1 to be led by node 1 or 2", || async {
        if leads(&c, 1, FIRST_SHARD).await || leads(&c, 2, FIRST_SHARD).await {
            return Some(());
        }
        let url = cleave_tests::Http::url(&c.api(1), "/admin/transfer-leader");
        let body = json!({"shard_id": FIRST_SHARD, "to_node": 1}).to_string();
        let _ = c.http.send(reqwest::Method::POST, url, Some(body)).await;
        None
    })
    .await;
    for i in 0..20 {
        put_retry(&c, &c.api(1), &format!("p/{i:02}"), json!(i)).await;
    }
    wait_for(secs(30), "node 3's replica to receive the writes made since it moved", || async {
        for i in 0..20 {
            let r = c.http.get(&base, &format!("p/{i:02}"), Some("stale")).await.ok()?;
            if r.status != 200 {
                return None;
            }
        }
        Some(())
    })
    .await;
    eprintln!("{}", moved.log_tail(3));
}

/// Issue 24.5. Three founders and four joiners; the founders are
/// decommissioned and stopped; a joiner that does not host the metadata
/// group restarts: it must find the metadata group again and serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_finds_the_metadata_group_after_the_founders_left() {
    let t0 = Instant::now();
    let c = Cluster::start(3, opts(&["--balance", "false"])).await;
    let mut joiners: Vec<(Vec<String>, String, ExtraNode)> = Vec::new();
    for j in 0..4 {
        let ports = free_ports(2);
        let (api, raft) = (format!("127.0.0.1:{}", ports[0]), format!("127.0.0.1:{}", ports[1]));
        let args: Vec<String> = [
            "--data-dir",
            &c.dir().join(format!("joiner{j}")).display().to_string(),
            "--listen-api",
            &api,
            "--listen-raft",
            &raft,
            "--balance",
            "false",
            "--join",
            &c.node(1).api_addr(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let node = ExtraNode::start(&args, c.dir().join(format!("joiner{j}.log")));
        joiners.push((args, format!("http://{api}"), node));
    }
    let bases: Vec<String> = joiners.iter().map(|(_, b, _)| b.clone()).collect();
    let ids: Vec<NodeId> = wait_for(secs(60), "every joiner to answer /health", || async {
        let mut ids = Vec::new();
        for b in &bases {
            let r = c.http.health(b).await.ok()?;
            if r.status != 200 {
                return None;
            }
            ids.push(r.value()["node_id"].as_u64()?);
        }
        Some(ids)
    })
    .await;
    wait_for(secs(30), "seven live nodes", || async {
        let ns = c.http.admin_nodes(&c.api(1)).await.ok()?;
        (ns.iter().filter(|n| n.status == NodeCondition::Up).count() == 7).then_some(())
    })
    .await;
    for f in 1..=3u64 {
        let r = admin_post(&c, 1, &format!("/admin/nodes/{f}/decommission"), &json!({})).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    wait_for(secs(180), "the founders to be decommissioned", || async {
        let ns = c.http.admin_nodes(&bases[0]).await.ok()?;
        let gone = ns.iter().filter(|n| n.id <= 3).all(|n| n.status == NodeCondition::Removed && n.replicas == 0);
        gone.then_some(())
    })
    .await;
    c.kill_all();
    let dir = directory_via(&c, &bases).await;
    let meta = replica_nodes_in(&dir, META);
    let pick = ids.iter().position(|id| !meta.contains(id)).expect("a joiner without a metadata replica");
    let (args, base, node) = joiners.swap_remove(pick);
    drop(node);
    // Restarted from its data directory alone.
    let again = ExtraNode::start(&args[..6], c.dir().join(format!("restarted{}.log", ids[pick])));
    wait_for(secs(60), "the restarted node to serve writes again", || async {
        let r = c.http.put(&base, "after/restart", &json!(1), None).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    eprintln!("restarted node {} serves; test took {:?}\n{}", ids[pick], t0.elapsed(), again.log_tail(3));
}
