//! Regression tests for defects found by reading the code (the first
//! correctness review), each against real node processes:
//! - a crafted RPC frame claiming a huge length must not abort the node;
//! - a split whose target node dies before its replica exists is cleaned up
//!   without that node, so the source shard is free again (a move off the
//!   dead node is accepted), and no split is placed on a node that is down;
//! - reads and scans served while ranges change hands never miss a key.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use cleave_tests::ledger::{preload, verify_ledger, verify_scan, Ledger, Load};
use cleave_tests::ops::{describe, ranges, split_kind, start_op, start_split, try_op, wait_done};
use cleave_tests::{
    free_ports, secs, wait_for, wait_until, Cluster, ClusterOpts, ErrorCode, ExtraNode, Liveness, OpKind, Phase,
    FIRST_SHARD,
};
use serde_json::json;

fn opts(args: &[&str]) -> ClusterOpts {
    ClusterOpts { extra_args: args.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

/// One RPC frame: `u32 length | u64 request id | body`.
fn frame(id: u64, body: &[u8]) -> Vec<u8> {
    let mut f = ((body.len() + 8) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(body);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_rpc_frames_claiming_huge_lengths_do_not_take_the_node_down() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    c.put_ok(1, "before", &json!(1)).await;
    // `Request::Node(NodeRequest::KvRead { shard: 1, key, .. })` whose key
    // claims 2^62 bytes (bincode varint: 253, then a little-endian u64).
    let mut huge_key = vec![1u8, 1, 1, 253];
    huge_key.extend_from_slice(&(1u64 << 62).to_le_bytes());
    // The same claim deeper inside a forwarded write (`KvWrite { shard: 1,
    // cmd: KvCommand { range_id: 1, epoch: 1, op: Put { key, .. } } }`), and
    // bytes that are no message at all.
    let mut huge_write = vec![1u8, 0, 1, 1, 1, 0, 253];
    huge_write.extend_from_slice(&(u64::MAX >> 1).to_le_bytes());
    let bodies = [huge_key, huge_write, vec![0xff; 12]];
    for i in 0..300u64 {
        let body = &bodies[i as usize % bodies.len()];
        // The node closes a connection after a frame it cannot decode, so
        // each frame goes on a connection of its own.
        let mut s = std::net::TcpStream::connect(c.node(1).raft_addr()).expect("connect to the RPC port");
        s.write_all(&frame(i, body)).expect("send the frame");
    }
    c.assert_running();
    c.put_ok(1, "after", &json!(2)).await;
    let item = c.read_retry(1, "before", Some("linearizable"), secs(10)).await.item();
    assert_eq!(item.version, 1);
    c.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_whose_target_node_died_is_cleaned_up_and_frees_its_shard() {
    // `planned` is held for 3 s: time to kill a target node before its
    // replica is created. No balancing, so only this test moves replicas.
    let c = Cluster::start(3, opts(&["--balance", "false", "--fault-hold", "planned=3000"])).await;
    let ledger = Arc::new(Ledger::default());
    let keys: Vec<String> = (0..100).map(|i| format!("k{i:03}")).collect();
    preload(&c, &ledger, &keys, 0).await;

    let id = start_split(&c, 1, json!({"key": "k050"})).await;
    let v = try_op(&c, id).await.expect("the split's operation");
    let OpKind::Split { target_replicas, .. } = &v.op.kind else { panic!("not a split: {}", describe(&v)) };
    assert_eq!(target_replicas.len(), 3, "with three nodes, node 3 holds a target replica");
    c.kill(3);
    // The replica on node 3 can never be created: the split aborts at its
    // setup deadline and its cleanup must not wait for node 3.
    let v = wait_for(secs(90), "the split to abort and be cleaned up without node 3", || async {
        let v = try_op(&c, id).await?;
        (v.op.phase == Phase::Aborted && v.op.cleaned).then_some(v)
    })
    .await;
    println!("{}", describe(&v));

    // While node 3 is down, no new split is placed on it: refused with a 503.
    wait_until(secs(15), "node 3 to be seen as not up", || async {
        let ns = c.http.admin_nodes(&c.api(1)).await.ok();
        ns.is_some_and(|ns| ns.iter().any(|n| n.id == 3 && n.liveness != Liveness::Up))
    })
    .await;
    let r = c.http.admin_split(&c.api(1), json!({"key": "k050"}).to_string()).await.unwrap();
    let e = r.expect_error(503, ErrorCode::Unavailable);
    assert!(e.error.message.contains("live"), "{e:?}");

    // The shard is free: its replica on the dead node moves to a new node.
    let ports = free_ports(2);
    let (api, raft) = (format!("127.0.0.1:{}", ports[0]), format!("127.0.0.1:{}", ports[1]));
    let data = c.dir().join("node4").display().to_string();
    let args: Vec<String> = ["--data-dir", &data, "--listen-api", &api, "--listen-raft", &raft, "--join"]
        .iter()
        .map(|s| s.to_string())
        .chain([c.node(1).api_addr(), "--balance".into(), "false".into()])
        .collect();
    let _joiner = ExtraNode::start(&args, c.dir().join("node4.log"));
    wait_until(secs(30), "node 4 to join", || async {
        let ns = c.http.admin_nodes(&c.api(1)).await.ok();
        ns.is_some_and(|ns| ns.iter().any(|n| n.id == 4 && n.liveness == Liveness::Up))
    })
    .await;
    let mv = start_op(&c, 1, "/admin/move", json!({"shard_id": FIRST_SHARD, "from_node": 3, "to_node": 4})).await;
    let v = wait_done(&c, mv, secs(90)).await;
    println!("{}", describe(&v));
    verify_ledger(&c, &ledger, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_scans_across_many_cutovers_never_miss_a_key() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let ledger = Arc::new(Ledger::default());
    let keys: Vec<String> = (0..400).map(|i| format!("r{i:04}")).collect();
    preload(&c, &ledger, &keys, 0).await;
    // Linearizable readers and whole-key-space scanners through every node:
    // a read of a key that exists must never answer 404, and each scan must
    // return every key once, in order (checked by the load's tasks).
    let mut load = Load::start(&c, &ledger, &keys, &[1, 2, 3], 2, 3);
    load.add_scanners(&c, &ledger, &keys, &[1, 2, 3], 2);
    let mut done = BTreeMap::new();
    for (i, key) in ["r0200", "r0100", "r0300", "r0050", "r0150", "r0250", "r0350"].iter().enumerate() {
        let id = start_split(&c, 1 + (i as u64 % 3), json!({"key": key})).await;
        let v = wait_done(&c, id, secs(60)).await;
        done.insert(split_kind(&v).1.to_string(), v.op.phase);
    }
    load.stop().await;
    ledger.assert_no_violations();
    assert_eq!(ranges(&c).await.len(), 8, "{done:?}");
    let items = verify_scan(&c, &ledger, 2, 13).await;
    assert_eq!(items.len(), keys.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_answers_within_its_deadline_when_the_shard_leader_is_frozen() {
    // Requests may take 1 s. The shard's leader is frozen (SIGSTOP): its
    // connections stay open and silent, so only the deadline ends a hop to it.
    let c = Cluster::start(3, opts(&["--request-timeout-ms", "1000", "--balance", "false"])).await;
    c.put_ok(1, "k", &json!(1)).await;
    let leader = c.wait_for_group_leader(FIRST_SHARD, None, secs(10)).await;
    let via = c.follower_of(leader);
    c.pause(leader);
    let margin = std::time::Duration::from_millis(700);
    for attempt in 0..3 {
        let t = std::time::Instant::now();
        let put = c.http.put(&c.api(via), &format!("k{attempt}"), &json!(attempt), None).await;
        let took = t.elapsed();
        println!(
            "PUT through node {via} with node {leader} frozen: {:?} after {took:?}",
            put.as_ref().map(|r| r.status)
        );
        assert!(took < secs(1) + margin, "a 1 s request answered after {took:?}");
        let t = std::time::Instant::now();
        let get = c.http.get(&c.api(via), "k", Some("linearizable")).await;
        let took = t.elapsed();
        println!("GET through node {via}: {:?} after {took:?}", get.as_ref().map(|r| r.status));
        assert!(took < secs(1) + margin, "a 1 s read answered after {took:?}");
    }
    c.resume(leader);
    c.assert_running();
}
