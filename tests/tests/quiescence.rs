//! Quiet groups (issue 13): an idle shard's replicas stop ticking and
//! heartbeating; any request wakes them; a quiet group whose leader dies
//! gets a new one through node-level liveness; a group with a lagging
//! member is never quiet; splits and moves of quiet groups work.

use std::time::{Duration, Instant};

use cleave_tests::ops::{range_of, ranges, start_op, start_split, wait_done};
use cleave_tests::{secs, wait_for, wait_until, Cluster, ClusterOpts, Http, NodeId, FIRST_SHARD};
use serde_json::json;

/// Failover bound of the issue: leader killed → first write through a
/// surviving node.
const FAILOVER_BOUND: Duration = Duration::from_secs(2);

fn no_balancer() -> ClusterOpts {
    ClusterOpts { extra_args: vec!["--balance".into(), "false".into()], ..ClusterOpts::default() }
}

/// Node `id`'s gauge `name` for `group` (absent: `None`).
async fn group_gauge(c: &Cluster, id: NodeId, name: &str, group: u64) -> Option<f64> {
    let r = c.http.get_path(&c.api(id), "/metrics").await.ok()?;
    let prefix = format!("{name}{{group=\"{group}\"}} ");
    r.body.lines().find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
}

/// Whether `group`'s replica on every node in `on` is quiet.
async fn quiet_on(c: &Cluster, group: u64, on: &[NodeId]) -> bool {
    for &id in on {
        if group_gauge(c, id, "cleave_raft_quiet", group).await != Some(1.0) {
            return false;
        }
    }
    true
}

async fn wait_quiet(c: &Cluster, group: u64, on: &[NodeId], timeout: Duration) {
    wait_until(timeout, format_args!("group {group} to go quiet on nodes {on:?}"), || quiet_on(c, group, on)).await;
}

/// Kills `group`'s leader and times the first successful write of a fresh
/// key through the surviving nodes (one request per surviving node in turn;
/// each may wait inside the router for the new leader).
async fn kill_leader_and_time_first_write(c: &Cluster, group: u64, key: &str) -> (NodeId, Duration) {
    let old = c.wait_for_group_leader(group, None, secs(10)).await;
    let ups: Vec<NodeId> = c.up_ids().into_iter().filter(|&n| n != old).collect();
    let http = Http::with_timeout(secs(5));
    c.kill(old);
    let killed = Instant::now();
    let mut attempt = 0usize;
    wait_for(secs(15), format_args!("a write of {key} after node {old} was killed"), || {
        attempt += 1;
        let api = c.api(ups[attempt % ups.len()]);
        let http = http.clone();
        async move {
            let r = http.put(&api, key, &json!({"after": "failover"}), None).await.ok()?;
            (r.status == 200).then(|| assert_eq!(r.write_result().version, 1, "fresh key {key}: {r:?}"))
        }
    })
    .await;
    (old, killed.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_group_wakes_for_a_write_and_a_linearizable_read_and_goes_quiet_again() {
    // No balancer: its leader moves would change the term this test watches.
    let c = Cluster::start(3, no_balancer()).await;
    let all = c.ids();
    assert_eq!(c.put_ok(1, "q/a", &json!("one")).await, 1);
    wait_quiet(&c, FIRST_SHARD, &all, secs(20)).await;
    // The metadata group never goes quiet.
    for &id in &all {
        assert_eq!(group_gauge(&c, id, "cleave_raft_quiet", 0).await, Some(0.0), "metadata group on node {id}");
    }
    let woken_before = cleave_tests::ops::metric_sum(&c, "cleave_raft_wakeups_total").await;

    // A write through a follower and a linearizable read wake it and are served.
    let leader = c.wait_for_group_leader(FIRST_SHARD, None, secs(5)).await;
    let term = group_gauge(&c, leader, "cleave_raft_term", FIRST_SHARD).await;
    let follower = c.follower_of(leader);
    assert_eq!(c.put_ok(follower, "q/a", &json!("two")).await, 2);
    let r = c.read_retry(follower, "q/a", Some("linearizable"), secs(5)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.item().version, 2);
    // Woken through a follower, the group keeps its leader: the follower
    // must not campaign against its quiet leader. (Give a campaign the time
    // it would take: two election timeouts.)
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for &id in &all {
        assert_eq!(
            group_gauge(&c, id, "cleave_raft_term", FIRST_SHARD).await,
            term,
            "term of group {FIRST_SHARD} on node {id} after a write through node {follower}"
        );
    }
    assert!(
        cleave_tests::ops::metric_sum(&c, "cleave_raft_wakeups_total").await > woken_before,
        "the write must have woken the group's replicas"
    );

    // A quiet leader's linearizable read still runs a quorum round: with
    // the group quiet again, a read through every node sees the last write.
    wait_quiet(&c, FIRST_SHARD, &all, secs(20)).await;
    for &id in &all {
        let r = c.read_retry(id, "q/a", Some("linearizable"), secs(5)).await;
        assert_eq!((r.status, r.item().version), (200, 2), "linearizable read through node {id}: {r:?}");
    }
    // Reads alone do not keep it awake.
    wait_quiet(&c, FIRST_SHARD, &all, secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_group_whose_leader_is_killed_serves_again_within_the_failover_bound() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    assert_eq!(c.put_ok(1, "q/before", &json!(1)).await, 1);
    wait_quiet(&c, FIRST_SHARD, &c.ids(), secs(20)).await;
    let (old, took) = kill_leader_and_time_first_write(&c, FIRST_SHARD, "q/after").await;
    println!("quiet group: first write {took:?} after killing leader node {old}");
    assert!(took <= FAILOVER_BOUND, "quiet group: first write {took:?} after the leader was killed");
    let new = c.wait_for_new_leader(FIRST_SHARD, old, secs(5)).await;
    assert_ne!(new, old);
    // Nothing acknowledged before was lost.
    let r = c.read_retry(new, "q/before", Some("linearizable"), secs(5)).await;
    assert_eq!((r.status, r.item().version), (200, 1), "{r:?}");
    // The node comes back; the group settles and goes quiet everywhere again.
    c.restart_and_wait(old).await;
    wait_quiet(&c, FIRST_SHARD, &c.ids(), secs(30)).await;
    let r = c.read_retry(old, "q/after", Some("stale"), secs(5)).await;
    assert_eq!(r.status, 200, "the restarted node caught up: {r:?}");
}

/// Whether every node in `on` reports a dormant replica (the cluster's one
/// shard: the metadata group is never quiet, so never dormant).
async fn dormant_on(c: &Cluster, on: &[NodeId]) -> bool {
    for &id in on {
        if c.metric(id, "cleave_raft_groups_dormant").await < 1.0 {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dormant_group_reopens_for_writes_reads_and_failover() {
    let opts = ClusterOpts {
        extra_args: vec!["--balance".into(), "false".into(), "--dormant-after-ms".into(), "300".into()],
        ..ClusterOpts::default()
    };
    let c = Cluster::start(3, opts).await;
    let all = c.ids();
    assert_eq!(c.put_ok(1, "d/a", &json!("one")).await, 1);
    wait_until(secs(30), "the shard's replicas to go dormant", || dormant_on(&c, &all)).await;
    let started = cleave_tests::ops::metric_sum(&c, "cleave_raft_instances_started_total").await;
    // A dormant leader still reports itself (from its last metrics).
    let leader = c.wait_for_group_leader(FIRST_SHARD, None, secs(5)).await;

    // A write through a follower and linearizable reads through every node
    // reopen the replicas and see the write.
    assert_eq!(c.put_ok(c.follower_of(leader), "d/a", &json!("two")).await, 2);
    for &id in &all {
        let r = c.read_retry(id, "d/a", Some("linearizable"), secs(5)).await;
        assert_eq!((r.status, r.item().version), (200, 2), "linearizable read through node {id}: {r:?}");
    }
    assert!(
        cleave_tests::ops::metric_sum(&c, "cleave_raft_instances_started_total").await > started,
        "the write must have reopened dormant replicas"
    );

    // Dormant again; the leader's node dies; a survivor takes over in time.
    wait_until(secs(30), "the shard's replicas to go dormant again", || dormant_on(&c, &all)).await;
    let (old, took) = kill_leader_and_time_first_write(&c, FIRST_SHARD, "d/after").await;
    println!("dormant group: first write {took:?} after killing leader node {old}");
    assert!(took <= FAILOVER_BOUND, "dormant group: first write {took:?} after the leader was killed");
    let r = c.read_retry(c.follower_of(old), "d/a", Some("linearizable"), secs(5)).await;
    assert_eq!((r.status, r.item().version), (200, 2), "nothing acknowledged is lost: {r:?}");
    // The node comes back; the group's leader (dormant, say) is roused and
    // brings it up to date.
    c.restart_and_wait(old).await;
    wait_for(secs(10), "the restarted node to catch up", || async {
        let r = c.http.get(&c.api(old), "d/after", Some("stale")).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    wait_until(secs(30), "dormant everywhere after the restart", || dormant_on(&c, &all)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_group_whose_leader_is_killed_serves_again_within_the_failover_bound() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.wait_for_group_leader(FIRST_SHARD, None, secs(10)).await;
    // Keep the group busy up to the kill: it is awake on every node.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (http, api, stop) = (c.http.clone(), c.api(c.follower_of(leader)), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                i += 1;
                let _ = http.put(&api, &format!("busy/{i}"), &json!(i), None).await;
            }
            i
        })
    };
    wait_until(secs(10), "the group to be busy and awake", || async {
        group_gauge(&c, leader, "cleave_raft_quiet", FIRST_SHARD).await == Some(0.0)
            && c.metric(c.follower_of(leader), "cleave_requests_total").await > 20.0
    })
    .await;
    let (old, took) = kill_leader_and_time_first_write(&c, FIRST_SHARD, "busy/after").await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(writer.await.unwrap() > 0);
    println!("busy group: first write {took:?} after killing leader node {old}");
    assert!(took <= FAILOVER_BOUND, "busy group: first write {took:?} after the leader was killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_a_lagging_member_is_not_quiet_until_it_caught_up() {
    let c = Cluster::start(3, ClusterOpts::small_logs(50, 20)).await;
    let leader = c.wait_for_group_leader(FIRST_SHARD, None, secs(10)).await;
    let lagging = c.follower_of(leader);
    // The follower misses a few hundred entries (enough to need a snapshot).
    c.pause(lagging);
    let via = c.up_ids().into_iter().find(|&n| n != lagging).unwrap();
    for i in 0..300 {
        c.put_ok(via, &format!("lag/{i:04}"), &json!(i)).await;
    }
    c.resume(lagging);
    // Until the follower holds the leader's whole log, the leader must not
    // be quiet; it ends quiet, with the follower caught up.
    let deadline = Instant::now() + secs(40);
    loop {
        let leader_quiet = group_gauge(&c, leader, "cleave_raft_quiet", FIRST_SHARD).await == Some(1.0);
        let (lead_log, follower_applied) = (
            group_gauge(&c, leader, "cleave_raft_last_log_index", FIRST_SHARD).await,
            group_gauge(&c, lagging, "cleave_raft_applied_index", FIRST_SHARD).await,
        );
        if leader_quiet {
            // Read again after seeing it quiet: the leader's log cannot move while quiet.
            let lead_log = group_gauge(&c, leader, "cleave_raft_last_log_index", FIRST_SHARD).await;
            assert!(
                follower_applied.is_some() && follower_applied >= lead_log,
                "leader quiet while node {lagging} has applied {follower_applied:?} of {lead_log:?}"
            );
            if quiet_on(&c, FIRST_SHARD, &c.ids()).await {
                break;
            }
        }
        assert!(Instant::now() < deadline, "never quiet: leader log {lead_log:?}, follower {follower_applied:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = c.read_retry(lagging, "lag/0299", Some("stale"), secs(5)).await;
    assert_eq!(r.status, 200, "the lagging follower caught up: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_groups_split_and_move() {
    // No automatic balancing: the test moves the replica itself.
    let c = Cluster::start(4, no_balancer()).await;
    for i in 0..20 {
        c.put_ok(1 + (i % 4) as NodeId, &format!("sm/{i:02}"), &json!(i)).await;
    }
    let holders = |shard| {
        let c = &c;
        async move {
            let s = cleave_tests::ops::shards(c).await;
            s.iter()
                .find(|s| s.shard_id == shard)
                .map(|s| s.replicas.iter().map(|r| r.node_id).collect::<Vec<NodeId>>())
                .unwrap_or_default()
        }
    };
    wait_quiet(&c, FIRST_SHARD, &holders(FIRST_SHARD).await, secs(30)).await;

    let split = start_split(&c, 1, json!({"key": "sm/10"})).await;
    wait_done(&c, split, secs(60)).await;
    let rs = ranges(&c).await;
    let (left, right) = (range_of(&rs, "sm/00").shard_id, range_of(&rs, "sm/10").shard_id);
    assert_ne!(left, right);
    wait_quiet(&c, right, &holders(right).await, secs(30)).await;

    // Move a replica of the quiet new shard to the node without one.
    let on = holders(right).await;
    let to = c.ids().into_iter().find(|n| !on.contains(n)).expect("a node without the shard");
    let mv = start_op(&c, 1, "/admin/move", json!({"shard_id": right, "from_node": on[0], "to_node": to})).await;
    wait_done(&c, mv, secs(60)).await;
    let now_on = holders(right).await;
    assert!(now_on.contains(&to) && !now_on.contains(&on[0]), "moved: {now_on:?}");
    for i in 0..20 {
        let r = c.read_retry(to, &format!("sm/{i:02}"), Some("linearizable"), secs(10)).await;
        assert_eq!((r.status, r.item().version), (200, 1), "sm/{i:02}: {r:?}");
    }
    wait_quiet(&c, right, &now_on, secs(30)).await;
}
