//! Replication on a 3-node cluster: forwarding, leader failover, catch-up of
//! a restarted node (from the log and from a snapshot), full restart.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cleave_tests::{
    secs, value_of, wait_for, wait_until, Cluster, ClusterOpts, ErrorCode, Http, Model, NodeId, FIRST_SHARD,
};
use serde_json::{json, Value};

/// Writes `count` fresh keys `{prefix}{i:04}` through the running nodes in
/// turn, 8 at a time, and records them in `model` (each must be version 1).
async fn write_fresh_keys(c: &Cluster, model: &mut Model, prefix: &str, count: usize) {
    let ups = c.up_ids();
    let mut set = tokio::task::JoinSet::new();
    let next = Arc::new(AtomicUsize::new(0));
    for w in 0..8usize {
        let (http, next, prefix) = (c.http.clone(), next.clone(), prefix.to_owned());
        let apis: Vec<String> = ups.iter().map(|&id| c.api(id)).collect();
        set.spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= count {
                    return done;
                }
                let key = format!("{prefix}{i:04}");
                let value = json!({"i": i, "prefix": prefix, "writer": w});
                let api = &apis[i % apis.len()];
                let r = http.put(api, &key, &value, None).await.unwrap_or_else(|e| panic!("PUT {key}: {e:#}"));
                assert_eq!(r.write_result().version, 1, "first write of {key}: {r:?}");
                done.push((key, value));
            }
        });
    }
    while let Some(res) = set.join_next().await {
        for (key, value) in res.expect("writer task panicked") {
            model.put(key, value, 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_any_node_are_readable_through_every_node() {
    let c = Cluster::start(3, ClusterOpts::default()).await;

    // The admin view matches how the cluster was started: three nodes with
    // the given addresses, shard 1 on all of them owning every key.
    for id in c.ids() {
        let api = c.api(id);
        let nodes = wait_for(secs(15), format_args!("node {id}'s /admin/nodes to list every API address"), || async {
            let nodes = c.http.admin_nodes(&api).await.ok()?;
            let complete = nodes.len() == 3
                && nodes.iter().all(|n| {
                    n.api_addr.as_deref().is_some_and(|a| a.trim_end_matches('/').ends_with(&c.node(n.id).api_addr()))
                });
            complete.then_some(nodes)
        })
        .await;
        for n in &nodes {
            assert_eq!(n.raft_addr, c.node(n.id).raft_addr(), "raft address of node {} as seen by node {id}", n.id);
        }
        let ids: BTreeSet<NodeId> = nodes.iter().map(|n| n.id).collect();
        assert_eq!(ids, BTreeSet::from([1, 2, 3]));

        let shards = c.http.admin_shards(&api).await.expect("/admin/shards");
        let s1 = shards.iter().find(|s| s.shard_id == FIRST_SHARD).expect("shard 1 listed");
        let on: BTreeSet<NodeId> = s1.replicas.iter().map(|r| r.node_id).collect();
        assert_eq!(on, BTreeSet::from([1, 2, 3]), "shard 1 replicas as seen by node {id}");

        let ranges = c.http.admin_ranges(&api).await.expect("/admin/ranges");
        assert_eq!(ranges.len(), 1, "one range at bootstrap: {ranges:?}");
        assert_eq!((ranges[0].start.as_str(), ranges[0].end.as_deref(), ranges[0].shard_id), ("", None, FIRST_SHARD));
    }

    // Writes through each node are immediately readable (linearizable)
    // through every node.
    let mut model = Model::new();
    for via in c.ids() {
        for i in 0..20 {
            let key = format!("r/{via}/{i:02}");
            let value = json!({"via": via, "i": i});
            assert_eq!(c.put_ok(via, &key, &value).await, 1);
            model.put(key, value, 1);
        }
    }
    for id in c.ids() {
        model.assert_on(&c, id, "linearizable", secs(5)).await;
    }

    // An overwrite through one node and a delete through another are seen
    // everywhere.
    let value = json!({"overwritten": true});
    assert_eq!(c.put_ok(2, "r/1/00", &value).await, 2);
    model.put("r/1/00", value, 2);
    let r = c.http.delete(&c.api(3), "r/2/05", None).await.expect("DELETE");
    assert_eq!(r.write_result().key, "r/2/05");
    model.delete("r/2/05");
    for id in c.ids() {
        model.assert_on(&c, id, "linearizable", secs(5)).await;
    }

    // Every node exports Prometheus metrics that count the requests served.
    for id in c.ids() {
        assert!(c.metric(id, "cleave_requests_total").await > 0.0, "node {id} counted no requests in /metrics");
    }

    // Every replica ends up with the same data (stale reads converge).
    for id in c.ids() {
        model.wait_on(&c, id, "stale", secs(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_catch_up_and_full_restart() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let mut model = Model::new();
    write_fresh_keys(&c, &mut model, "before/", 30).await;

    // Kill -9 the shard leader: a write must succeed again within ~10 s.
    let old = c.wait_for_leader(FIRST_SHARD, secs(10)).await;
    c.kill(old);
    let killed_at = Instant::now();
    let quick = Http::with_timeout(Duration::from_secs(2));
    let ups = c.up_ids();
    let mut attempt = 0usize;
    let (key, value) = wait_for(secs(10), "a write to succeed after the leader was killed", || {
        attempt += 1;
        let key = format!("failover/{attempt:04}");
        let api = c.api(ups[attempt % ups.len()]);
        let quick = quick.clone();
        async move {
            let value = json!({"attempt": attempt});
            let r = quick.put(&api, &key, &value, None).await.ok()?;
            (r.status == 200).then(|| {
                assert_eq!(r.write_result().version, 1, "fresh key {key}");
                (key, value)
            })
        }
    })
    .await;
    println!("first write after killing leader node {old} succeeded after {:?}", killed_at.elapsed());
    model.put(key, value, 1);
    let new = c.wait_for_new_leader(FIRST_SHARD, old, secs(10)).await;
    println!("new leader of shard 1: node {new}");

    // More writes while the old leader is down: new keys and overwrites.
    write_fresh_keys(&c, &mut model, "during/", 50).await;
    for i in 0..10 {
        let key = format!("before/{i:04}");
        let value = json!({"overwritten_while": format!("node {old} down")});
        assert_eq!(c.put_ok(ups[i % ups.len()], &key, &value).await, 2);
        model.put(key, value, 2);
    }
    for &id in &ups {
        model.assert_on(&c, id, "linearizable", secs(5)).await;
    }

    // The old leader comes back and catches up: its own replica (stale
    // reads) shows the latest values.
    c.restart_and_wait(old).await;
    let t = Instant::now();
    model.wait_on(&c, old, "stale", secs(30)).await;
    println!("restarted node {old} caught up in {:?}", t.elapsed());
    model.assert_on(&c, old, "linearizable", secs(10)).await;

    // All three killed at once and restarted: nothing acknowledged is lost.
    c.kill_all();
    c.restart_all().await;
    for id in c.ids() {
        model.assert_on(&c, id, "linearizable", secs(15)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_the_retained_log_catches_up_from_a_snapshot() {
    // Snapshot every 50 entries, keep 10 behind it: 400 writes while the
    // follower is down leave it far behind the oldest retained entry.
    let c = Cluster::start(3, ClusterOpts::small_logs(50, 10)).await;
    let mut model = Model::new();
    write_fresh_keys(&c, &mut model, "early/", 20).await;
    let leader = c.wait_for_leader(FIRST_SHARD, secs(10)).await;
    let follower = c.follower_of(leader);
    model.wait_on(&c, follower, "stale", secs(10)).await;

    c.kill(follower);
    write_fresh_keys(&c, &mut model, "late/", 400).await;
    for i in 0..20 {
        let key = format!("early/{i:04}");
        let value = json!({"rewritten": i});
        assert_eq!(c.put_ok(leader, &key, &value).await, 2);
        model.put(key, value, 2);
    }
    let r = c.http.delete(&c.api(leader), "late/0007", None).await.expect("DELETE");
    assert_eq!(r.write_result().key, "late/0007");
    model.delete("late/0007");

    // The leader must have dropped from its log the entries the follower
    // misses, so that only a snapshot can bring it up to date.
    wait_until(secs(20), format!("leader {leader} to purge its log past index 300"), || async {
        c.metric_lines(leader, "cleave_raft_purged_index{group=\"1\"}")
            .await
            .split_whitespace()
            .last()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v >= 300.0)
    })
    .await;
    c.restart_and_wait(follower).await;
    let t = Instant::now();
    model.wait_on(&c, follower, "stale", secs(40)).await;
    println!("follower {follower} caught up on {} keys in {:?}", model.len(), t.elapsed());
    let installed = c.metric(follower, "cleave_snapshots_installed_total").await;
    assert!(
        installed >= 1.0,
        "follower {follower} caught up without installing a snapshot; its snapshot metrics:\n{}",
        c.metric_lines(follower, "snapshot").await
    );

    // The snapshot-restored follower is a full member: with the leader
    // killed, it and the third node still elect a leader and serve it all.
    c.kill(leader);
    let new = c.wait_for_new_leader(FIRST_SHARD, leader, secs(15)).await;
    println!("leader after killing node {leader}: node {new}");
    model.assert_on(&c, follower, "linearizable", secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_leader_kill_mid_write_loop() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.wait_for_leader(FIRST_SHARD, secs(10)).await;

    // One task writes sequential keys, rotating over the nodes; it moves on
    // to the next key and node on any failure, so every key is attempted
    // once and an acknowledged key must be at version 1.
    let acked: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let attempted = Arc::new(AtomicUsize::new(0));
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, attempted, count, stop) = (acked.clone(), attempted.clone(), count.clone(), stop.clone());
        let http = Http::with_timeout(Duration::from_secs(3));
        let apis = c.apis();
        tokio::spawn(async move {
            let mut node = 0usize;
            let mut seq = 0usize;
            while !stop.load(Ordering::SeqCst) && seq < 100_000 {
                let key = format!("loop/{seq:06}");
                let value = json!({"seq": seq});
                attempted.store(seq + 1, Ordering::SeqCst);
                match http.put(&apis[node % apis.len()], &key, &value, None).await {
                    Ok(r) if r.status == 200 => {
                        let w = r.write_result();
                        assert_eq!((w.key.as_str(), w.version), (key.as_str(), 1), "ack of a fresh key: {r:?}");
                        acked.lock().unwrap().push((key, value));
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => {
                        // A refusal must be a transient, well-formed error.
                        assert!(r.is_transient(), "unexpected answer to PUT {key} during failover: {r:?}");
                        r.error();
                        node += 1;
                    }
                    Err(_) => node += 1,
                }
                seq += 1;
            }
        })
    };

    wait_until(secs(20), "50 acknowledged writes before the kill", || async { count.load(Ordering::SeqCst) >= 50 })
        .await;
    c.kill(leader);
    let at_kill = count.load(Ordering::SeqCst);
    let killed = Instant::now();
    wait_until(secs(30), "50 more acknowledged writes after the leader was killed", || async {
        count.load(Ordering::SeqCst) >= at_kill + 50
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    writer.await.expect("writer task panicked");
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let attempted = attempted.load(Ordering::SeqCst);
    println!(
        "killed leader {leader} after {at_kill} acks; {} acked of {attempted} attempted; 50 more acks took {:?}",
        acked.len(),
        killed.elapsed()
    );

    // Every acknowledged write is readable through each surviving node.
    let mut model = Model::new();
    for (key, value) in &acked {
        model.put(key.clone(), value.clone(), 1);
    }
    for id in c.up_ids() {
        model.assert_on(&c, id, "linearizable", secs(10)).await;
    }

    // The killed leader comes back and converges on the same history.
    c.restart_and_wait(leader).await;
    model.wait_on(&c, leader, "stale", secs(30)).await;

    // Keys whose write was not acknowledged either took effect whole or not
    // at all, and the restarted node agrees with the others on which. (A
    // timed-out write may still commit late, so compare until they agree.)
    let acked_keys: BTreeSet<&str> = acked.iter().map(|(k, _)| k.as_str()).collect();
    let survivor = c.up_ids().into_iter().find(|&id| id != leader).expect("a survivor");
    let mut took_effect = 0;
    for seq in 0..attempted {
        let key = format!("loop/{seq:06}");
        if acked_keys.contains(key.as_str()) {
            continue;
        }
        let (survivor_api, leader_api) = (c.api(survivor), c.api(leader));
        let present = wait_for(secs(15), format_args!("nodes {survivor} and {leader} to agree on {key}"), || async {
            let lin = c.http.get(&survivor_api, &key, Some("linearizable")).await.ok()?;
            let stale = c.http.get(&leader_api, &key, Some("stale")).await.ok()?;
            for r in [&lin, &stale] {
                match r.status {
                    200 => {
                        let item = r.item();
                        assert_eq!((value_of(&item), item.version), (json!({"seq": seq}), 1), "unacked {key}: {r:?}");
                    }
                    404 => assert_eq!(r.error().error.code, ErrorCode::NotFound),
                    _ => return None,
                }
            }
            (lin.status == stale.status).then_some(lin.status == 200)
        })
        .await;
        took_effect += present as usize;
    }
    println!("{took_effect} of {} unacknowledged writes took effect", attempted - acked.len());
}
