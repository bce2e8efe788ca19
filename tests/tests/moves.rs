//! Replica moves, leader transfers, decommissioning and self-healing, on
//! real node processes: a replica moves under write load, the target or a
//! leader is killed half way (also while the group sits in its joint
//! configuration), a metadata-group replica moves, a joining node receives
//! replicas and leaders, a node lost for good is replaced, and a node is
//! decommissioned under load.
//!
//! Invariants checked throughout: no acknowledged write is lost (the shared
//! ledger), every move ends (done, or aborted and cleaned up), and afterwards
//! each group's Raft configuration is a single voter set equal to the
//! replica set the directory records — no joint configuration left behind.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_tests::ledger::{preload, verify_ledger, Ledger, Load};
use cleave_tests::ops::{admin_post, describe, shards, start_op, wait_done, wait_ended, wait_phase};
use cleave_tests::{
    free_ports, secs, wait_for, Cluster, ClusterOpts, ErrorCode, ExtraNode, NodeId, NodeStatus, OpKind, Phase, ShardId,
    FIRST_SHARD,
};
use serde_json::json;

const META: ShardId = 0;

fn opts(args: &[&str]) -> ClusterOpts {
    ClusterOpts { extra_args: args.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:05}")).collect()
}

/// Starts moving `shard`'s replica from `from` to `to`; returns the operation id.
async fn start_move(c: &Cluster, via: NodeId, shard: ShardId, from: NodeId, to: NodeId) -> u64 {
    start_op(c, via, "/admin/move", json!({"shard_id": shard, "from_node": from, "to_node": to})).await
}

/// `/admin/nodes` from some running node, by id.
async fn nodes(c: &Cluster) -> BTreeMap<NodeId, NodeStatus> {
    wait_for(secs(15), "/admin/nodes to answer", || async {
        for id in c.up_ids() {
            if let Ok(n) = c.http.admin_nodes(&c.api(id)).await {
                return Some(n.into_iter().map(|n| (n.id, n)).collect());
            }
        }
        None
    })
    .await
}

/// The nodes hosting `group`'s replicas according to the directory.
async fn replica_nodes(c: &Cluster, group: ShardId) -> Vec<NodeId> {
    let dir = wait_for(secs(15), "/admin/directory to answer", || async {
        for id in c.up_ids() {
            if let Ok(r) = c.http.get_path(&c.api(id), "/admin/directory").await {
                if r.status == 200 {
                    return Some(r.value());
                }
            }
        }
        None
    })
    .await;
    let g = if group == META { &dir["meta"] } else { &dir["shards"][group.to_string()] };
    let mut v: Vec<NodeId> =
        g["replicas"].as_array().map(|a| a.iter().filter_map(|r| r["node_id"].as_u64()).collect()).unwrap_or_default();
    v.sort();
    v
}

/// The leader of `group` among the running nodes, from their metrics, and
/// that leader's voter-set count and voter count.
async fn group_config(c: &Cluster, group: ShardId) -> Option<(NodeId, u64, u64)> {
    let label = format!("{{group=\"{group}\"}}");
    for id in c.up_ids() {
        if c.metric(id, &format!("cleave_raft_is_leader{label}")).await == 1.0 {
            let sets = c.metric(id, &format!("cleave_raft_voter_sets{label}")).await as u64;
            let voters = c.metric(id, &format!("cleave_raft_voters{label}")).await as u64;
            return Some((id, sets, voters));
        }
    }
    None
}

/// Waits until `group` has a leader whose configuration is one voter set of
/// `replicas` voters and the directory lists `replicas` replicas; for data
/// shards also that the leader's voter set is exactly the directory's.
async fn wait_settled(c: &Cluster, group: ShardId, replicas: usize, timeout: Duration) {
    wait_for(timeout, format_args!("group {group} to settle on {replicas} voters, no joint configuration"), || async {
        if replica_nodes(c, group).await.len() != replicas {
            return None;
        }
        if group == META {
            let (_, sets, voters) = group_config(c, group).await?;
            return (sets == 1 && voters == replicas as u64).then_some(());
        }
        // The leader's report, whichever node (a joined one too) it is on.
        let s = shards(c).await.into_iter().find(|s| s.shard_id == group)?;
        let mut want: Vec<u64> = s.replicas.iter().map(|r| r.replica_id).collect();
        want.sort();
        let got = s.raft_voters?;
        (got.len() == 1 && got[0] == want).then_some(())
    })
    .await;
}

/// Every ledger key read locally (stale read) on `node` shows its last
/// acknowledged write: the node's replica holds all the data.
async fn assert_local_copy(c: &Cluster, ledger: &Ledger, node: NodeId) {
    let keys = ledger.key_list();
    wait_for(secs(30), format_args!("node {node}'s replica to hold every key"), || async {
        for key in &keys {
            let r = c.http.get(&c.api(node), key, Some("stale")).await.ok()?;
            if ledger.mismatch(key, &r).is_some() {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// The Raft groups node `id` holds on disk: restarts it and reads
/// `cleave_groups` before anything could change them.
async fn groups_on_disk(c: &Cluster, id: NodeId) -> u64 {
    c.kill(id);
    c.restart_and_wait(id).await;
    c.metric(id, "cleave_groups").await as u64
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_moves_under_write_load_and_the_source_deletes_its_data() {
    let c = Cluster::start(4, opts(&["--balance", "false"])).await;
    let ledger = Arc::new(Ledger::default());
    let ks = keys("mv/", 400);
    preload(&c, &ledger, &ks, 200).await;
    // Move the replica of the shard's leader, so leadership has to go first.
    let leader = c.wait_for_group_leader(FIRST_SHARD, None, secs(10)).await;
    let before_groups = c.metric(leader, "cleave_groups").await as u64;
    let load = Load::start(&c, &ledger, &ks, &[1, 2, 3, 4], 4, 2);
    wait_for(secs(10), "writes to flow", || async { (ledger.ack_count() > ks.len() + 50).then_some(()) }).await;
    let acks_before = ledger.ack_count();
    let t = Instant::now();
    let op = start_move(&c, 4, FIRST_SHARD, leader, 4).await;
    let v = wait_done(&c, op, secs(60)).await;
    let took = t.elapsed();
    // Keep writing a little after the move, through every node.
    let acks_at_end = ledger.ack_count();
    wait_for(secs(10), "writes to go on after the move", || async {
        (ledger.ack_count() > acks_at_end + 50).then_some(())
    })
    .await;
    load.stop().await;
    eprintln!(
        "move of shard {FIRST_SHARD} from node {leader} to node 4 took {took:?}; {} writes acknowledged during it; {}",
        acks_at_end - acks_before,
        describe(&v)
    );
    assert!(acks_at_end > acks_before, "writes kept being acknowledged while the replica moved");

    let mut want: Vec<NodeId> = (1..=4).filter(|n| *n != leader).collect();
    want.sort();
    assert_eq!(replica_nodes(&c, FIRST_SHARD).await, want);
    wait_settled(&c, FIRST_SHARD, 3, secs(20)).await;
    let OpKind::Move { to, .. } = &v.op.kind else { panic!("not a move: {}", describe(&v)) };
    let s = shards(&c).await.into_iter().find(|s| s.shard_id == FIRST_SHARD).expect("shard 1");
    assert!(s.replicas.contains(to), "the new replica id is in the directory: {s:?}");
    assert_ne!(s.leader, Some(leader), "the source gave up leadership");
    for id in c.ids() {
        verify_ledger(&c, &ledger, id).await;
    }
    assert_local_copy(&c, &ledger, 4).await;
    // The source deleted its replica, data included: on restart it opens
    // one group fewer than before.
    assert_eq!(groups_on_disk(&c, leader).await, before_groups - 1, "node {leader} still holds shard 1 on disk");
    verify_ledger(&c, &ledger, leader).await;
}

/// Kills `victim(c, op)` while a move sits in `phase` (held there by the
/// fault point), restarts it, and checks the move ends cleanly.
async fn kill_mid_move(phase: Phase, victim: &str) {
    let hold = format!("{}=3000", serde_json::to_value(phase).unwrap().as_str().unwrap());
    let c = Cluster::start(4, opts(&["--balance", "false", "--fault-hold", &hold])).await;
    let ledger = Arc::new(Ledger::default());
    let ks = keys("k/", 200);
    preload(&c, &ledger, &ks, 100).await;
    let from = c.follower_of(c.wait_for_group_leader(FIRST_SHARD, None, secs(10)).await);
    let load = Load::start(&c, &ledger, &ks, &[1, 2, 3, 4], 2, 1);
    let op = start_move(&c, 1, FIRST_SHARD, from, 4).await;
    wait_phase(&c, op, phase, secs(30)).await;
    if phase == Phase::Joint {
        // The hold keeps the group in its joint configuration.
        wait_for(secs(15), "the group to be in its joint configuration", || async {
            let (_, sets, _) = group_config(&c, FIRST_SHARD).await?;
            (sets == 2).then_some(())
        })
        .await;
    }
    let id = match victim {
        "target" => 4,
        "shard leader" => c.wait_for_group_leader(FIRST_SHARD, None, secs(10)).await,
        "metadata leader" => c.wait_for_group_leader(META, None, secs(10)).await,
        other => panic!("unknown victim {other}"),
    };
    eprintln!("killing the {victim} (node {id}) while move {op} is {phase:?}");
    c.kill(id);
    c.restart_and_wait(id).await;
    let v = wait_ended(&c, op, secs(90)).await;
    load.stop().await;
    eprintln!("{}", describe(&v));
    match v.op.phase {
        Phase::Done => {
            let mut want: Vec<NodeId> = (1..=4).filter(|n| *n != from).collect();
            want.sort();
            assert_eq!(replica_nodes(&c, FIRST_SHARD).await, want, "{}", describe(&v));
        }
        Phase::Aborted => {
            assert!(phase < Phase::Joint, "a move aborted past its point of no return: {}", describe(&v));
            assert_eq!(replica_nodes(&c, FIRST_SHARD).await, vec![1, 2, 3], "{}", describe(&v));
        }
        p => panic!("move ended in {p:?}"),
    }
    wait_settled(&c, FIRST_SHARD, 3, secs(30)).await;
    for id in c.ids() {
        verify_ledger(&c, &ledger, id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_target_while_it_learns_ends_the_move_cleanly() {
    kill_mid_move(Phase::Learning, "target").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_target_in_the_joint_configuration_ends_the_move_cleanly() {
    kill_mid_move(Phase::Joint, "target").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_joint_configuration_is_finished_after_the_shard_leader_dies() {
    kill_mid_move(Phase::Joint, "shard leader").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_metadata_leader_mid_move_ends_the_move_cleanly() {
    kill_mid_move(Phase::Joint, "metadata leader").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_replica_moves_even_off_the_metadata_leader() {
    let c = Cluster::start(4, opts(&["--balance", "false"])).await;
    let meta_leader = c.wait_for_group_leader(META, None, secs(10)).await;
    let op = start_move(&c, 4, META, meta_leader, 4).await;
    let v = wait_done(&c, op, secs(60)).await;
    eprintln!("{}", describe(&v));
    let mut want: Vec<NodeId> = (1..=4).filter(|n| *n != meta_leader).collect();
    want.sort();
    assert_eq!(replica_nodes(&c, META).await, want);
    wait_settled(&c, META, 3, secs(20)).await;
    let new_leader = c.wait_for_group_leader(META, None, secs(10)).await;
    assert_ne!(new_leader, meta_leader);
    // The cluster still takes directory changes (a split) and data, through
    // every node, the one without a metadata replica included.
    let split = start_op(&c, meta_leader, "/admin/split", json!({"key": "m"})).await;
    wait_done(&c, split, secs(60)).await;
    for id in c.ids() {
        c.put_ok(id, &format!("after/{id}"), &json!(id)).await;
    }
    // Restarted, the old leader opens no metadata replica: it was deleted.
    groups_on_disk(&c, meta_leader).await;
    let meta_series = c.metric_lines(meta_leader, "cleave_raft_term{group=\"0\"}").await;
    assert!(meta_series.is_empty(), "node {meta_leader} reopened a metadata replica: {meta_series}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_transfer_and_bad_move_requests() {
    let c = Cluster::start(4, opts(&["--balance", "false"])).await;
    let leader = c.wait_for_group_leader(FIRST_SHARD, None, secs(10)).await;
    let to = c.follower_of(leader);
    let r = admin_post(&c, 4, "/admin/transfer-leader", &json!({"shard_id": FIRST_SHARD, "to_node": to})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.value()["leader"], json!(to));
    assert_eq!(c.wait_for_group_leader(FIRST_SHARD, Some(leader), secs(10)).await, to);

    let bad = [
        ("/admin/transfer-leader", json!({"shard_id": FIRST_SHARD, "to_node": 4}), 400, ErrorCode::BadRequest),
        ("/admin/transfer-leader", json!({"shard_id": 99, "to_node": 1}), 404, ErrorCode::NotFound),
        ("/admin/transfer-leader", json!({"shard": 1}), 400, ErrorCode::BadRequest),
        ("/admin/move", json!({"shard_id": 99, "from_node": 1, "to_node": 4}), 404, ErrorCode::NotFound),
        ("/admin/move", json!({"shard_id": 1, "from_node": 1, "to_node": 9}), 404, ErrorCode::NotFound),
        ("/admin/move", json!({"shard_id": 1, "from_node": 4, "to_node": 1}), 400, ErrorCode::BadRequest),
        ("/admin/move", json!({"shard_id": 1, "from_node": 1, "to_node": 2}), 400, ErrorCode::BadRequest),
        ("/admin/move", json!({"shard_id": 1, "from_node": 1, "to_node": 1}), 400, ErrorCode::BadRequest),
        ("/admin/move", json!([1, 2, 3]), 400, ErrorCode::BadRequest),
        ("/admin/nodes/9/decommission", json!({}), 404, ErrorCode::NotFound),
    ];
    for (path, body, status, code) in bad {
        let r = admin_post(&c, 1, path, &body).await;
        let e = r.expect_error(status, code);
        assert!(!e.error.message.is_empty(), "{path} {body}: {r:?}");
    }
    let r = c.http.send(reqwest::Method::POST, cleave_tests::Http::url(&c.api(1), "/admin/nodes/x/decommission"), None);
    r.await.expect("POST").expect_error(400, ErrorCode::BadRequest);

    // One operation per shard: a second move while the first is held is refused.
    let c2 = Cluster::start(4, opts(&["--balance", "false", "--fault-hold", "learning=4000"])).await;
    let op = start_move(&c2, 1, FIRST_SHARD, 1, 4).await;
    wait_phase(&c2, op, Phase::Learning, secs(30)).await;
    let r = admin_post(&c2, 1, "/admin/move", &json!({"shard_id": FIRST_SHARD, "from_node": 2, "to_node": 4})).await;
    r.expect_error(409, ErrorCode::VersionConflict);
    let r = admin_post(&c2, 1, "/admin/split", &json!({"key": "m"})).await;
    r.expect_error(409, ErrorCode::VersionConflict);
    // A move can be cancelled before its joint phase; the learner is removed.
    let r = admin_post(&c2, 1, &format!("/admin/operations/{op}/cancel"), &json!({})).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = wait_ended(&c2, op, secs(30)).await;
    assert_eq!(v.op.phase, Phase::Aborted, "{}", describe(&v));
    assert_eq!(replica_nodes(&c2, FIRST_SHARD).await, vec![1, 2, 3]);
    wait_settled(&c2, FIRST_SHARD, 3, secs(20)).await;
    wait_for(secs(30), "node 4 to delete the cancelled move's replica", || async {
        (c2.metric(4, "cleave_groups").await == 0.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_receives_replicas_and_leaders() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    for key in ["d", "h", "p", "t"] {
        let op = start_op(&c, 1, "/admin/split", json!({"key": key})).await;
        wait_done(&c, op, secs(60)).await;
    }
    let ledger = Arc::new(Ledger::default());
    let ks: Vec<String> = ["a", "e", "i", "q", "u"].iter().flat_map(|p| keys(&format!("{p}/"), 40)).collect();
    preload(&c, &ledger, &ks, 50).await;

    let ports = free_ports(2);
    let (api, raft) = (format!("127.0.0.1:{}", ports[0]), format!("127.0.0.1:{}", ports[1]));
    let args: Vec<String> = [
        "--data-dir",
        &c.dir().join("node4").display().to_string(),
        "--listen-api",
        &api,
        "--listen-raft",
        &raft,
        "--join",
        &c.node(1).api_addr(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let joiner = ExtraNode::start(&args, c.dir().join("node4.log"));
    let t = Instant::now();
    // 5 shards + the metadata group = 18 replicas: balanced is 4 or 5 each.
    let view = wait_for(secs(120), "the rebalancer to give node 4 replicas and a leader, evenly", || async {
        let ns = nodes(&c).await;
        let n4 = ns.get(&4)?;
        let counts: Vec<usize> = ns.values().map(|n| n.replicas).collect();
        let leaders: Vec<usize> = ns.values().map(|n| n.leaders).collect();
        let even = |v: &[usize]| v.iter().max().unwrap_or(&0) - v.iter().min().unwrap_or(&0) <= 1;
        let busy = c.http.admin_operations(&c.api(1)).await.ok()?.iter().any(|o| !o.op.phase.is_terminal());
        (n4.replicas >= 4 && n4.leaders >= 1 && even(&counts) && even(&leaders) && !busy).then_some(ns)
    })
    .await;
    eprintln!(
        "balanced after {:?}: {:?}\n{}",
        t.elapsed(),
        view.values().map(|n| (n.id, n.replicas, n.leaders)).collect::<Vec<_>>(),
        joiner.log_tail(5)
    );
    for id in c.ids() {
        verify_ledger(&c, &ledger, id).await;
    }
    for s in shards(&c).await {
        wait_settled(&c, s.shard_id, 3, secs(30)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_for_good_is_replaced_within_node_dead_after() {
    let dead_after = 5;
    let c = Cluster::start(4, opts(&["--node-dead-after", &dead_after.to_string()])).await;
    let op = start_op(&c, 1, "/admin/split", json!({"key": "m"})).await;
    wait_done(&c, op, secs(60)).await;
    let ledger = Arc::new(Ledger::default());
    let ks: Vec<String> = keys("a/", 150).into_iter().chain(keys("x/", 150)).collect();
    preload(&c, &ledger, &ks, 100).await;
    // Wait for the rebalancer to settle first (node 4 gets its share).
    wait_for(secs(90), "no operation running", || async {
        let ops = c.http.admin_operations(&c.api(1)).await.ok()?;
        ops.iter().all(|o| o.op.phase.is_terminal()).then_some(())
    })
    .await;
    // Lose the node holding the most replicas (the metadata leader if it ties).
    let ns = nodes(&c).await;
    let victim = ns.values().max_by_key(|n| n.replicas).map(|n| n.id).expect("nodes");
    let survivor = c.ids().into_iter().find(|n| *n != victim).expect("a survivor");
    eprintln!("killing node {victim} for good: {:?}", ns.values().map(|n| (n.id, n.replicas)).collect::<Vec<_>>());
    c.kill(victim);
    let t = Instant::now();
    let bound = secs(dead_after + 90);
    let mut groups: Vec<ShardId> = shards(&c).await.iter().map(|s| s.shard_id).collect();
    groups.push(META);
    for g in &groups {
        wait_for(bound.saturating_sub(t.elapsed()), format_args!("group {g} to leave node {victim}"), || async {
            let r = replica_nodes(&c, *g).await;
            (r.len() == 3 && !r.contains(&victim)).then_some(())
        })
        .await;
        wait_settled(&c, *g, 3, bound.saturating_sub(t.elapsed()).max(secs(5))).await;
    }
    eprintln!(
        "healed {} groups after losing node {victim} in {:?} (node_dead_after {dead_after}s)",
        groups.len(),
        t.elapsed()
    );
    assert!(t.elapsed() >= secs(dead_after), "healing must wait for node_dead_after");
    for id in c.up_ids() {
        verify_ledger(&c, &ledger, id).await;
    }
    c.put_ok(survivor, "after/heal", &json!(1)).await;
    let ns = nodes(&c).await;
    assert_eq!(ns[&victim].replicas, 0, "{:?}", ns[&victim]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_decommissioned_under_load() {
    let c = Cluster::start(4, opts(&["--balance", "false"])).await;
    let op = start_op(&c, 1, "/admin/split", json!({"key": "m"})).await;
    wait_done(&c, op, secs(60)).await;
    let ledger = Arc::new(Ledger::default());
    let ks: Vec<String> = keys("b/", 150).into_iter().chain(keys("y/", 150)).collect();
    preload(&c, &ledger, &ks, 100).await;
    let victim = c.wait_for_group_leader(META, None, secs(10)).await;
    let load = Load::start(&c, &ledger, &ks, &c.ids(), 3, 1);
    let r = admin_post(&c, 4, &format!("/admin/nodes/{victim}/decommission"), &json!({})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.value()["status"], json!("decommissioning"));
    // The three other nodes are now exactly enough for three replicas per
    // group: decommissioning one of them could never finish, so it is refused.
    let other = c.ids().into_iter().find(|n| *n != victim).expect("another node");
    let r = admin_post(&c, 4, &format!("/admin/nodes/{other}/decommission"), &json!({})).await;
    let e = r.expect_error(400, ErrorCode::BadRequest);
    assert!(e.error.message.contains("add a node"), "{r:?}");
    assert_ne!(nodes(&c).await[&other].status, cleave_tests::NodeCondition::Decommissioning);
    let t = Instant::now();
    let gone = wait_for(secs(120), format_args!("node {victim} to be decommissioned"), || async {
        let ns = nodes(&c).await;
        let n = ns.get(&victim)?;
        (n.replicas == 0 && n.status == cleave_tests::NodeCondition::Removed).then_some(ns)
    })
    .await;
    load.stop().await;
    eprintln!(
        "decommissioned node {victim} in {:?}: {:?}",
        t.elapsed(),
        gone.values().map(|n| (n.id, n.replicas)).collect::<Vec<_>>()
    );
    let mut groups: Vec<ShardId> = shards(&c).await.iter().map(|s| s.shard_id).collect();
    groups.push(META);
    for g in groups {
        let r = replica_nodes(&c, g).await;
        assert!(r.len() == 3 && !r.contains(&victim), "group {g} on {r:?}");
        wait_settled(&c, g, 3, secs(30)).await;
    }
    for id in c.ids().into_iter().filter(|n| *n != victim) {
        verify_ledger(&c, &ledger, id).await;
    }
    assert_eq!(groups_on_disk(&c, victim).await, 0, "the removed node deleted every replica");
    let ops = c.http.admin_operations(&c.api(1)).await.expect("ops");
    for o in ops.iter().filter(|o| matches!(o.op.kind, OpKind::Move { .. })) {
        assert_eq!(o.op.phase, Phase::Done, "{}", describe(o));
    }
}
