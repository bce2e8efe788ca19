//! Range merges (`POST /admin/merge`): two neighbouring ranges become one
//! range of the left one's shard while clients read, write and watch both,
//! under kills of either shard's leader or the metadata leader at every
//! phase, by the rebalancer on its own, and with bad admin input.
//!
//! Invariants checked (as for splits): no acknowledged write is lost, a
//! key's version never goes backwards, the ranges always tile the key space,
//! an aborted merge leaves both ranges as they were, a committed merge
//! always finishes, and the right shard's replicas are deleted.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cleave_client::{Client, WatchEvent, WatchRequest};
use cleave_tests::ledger::{preload, value_for, verify_ledger, verify_scan, Ledger, Load};
use cleave_tests::ops::{
    admin_post, assert_merge_outcome, describe, groups_per_node, metric_sum, range_of, ranges, shards, start_merge,
    start_split, try_op, wait_all_shards_led, wait_done, wait_ended, wait_phase, Victim, PHASES,
};
use cleave_tests::watching::Watching;
use cleave_tests::{secs, wait_until, Cluster, ClusterOpts, Http, OpKind, Phase, FIRST_SHARD};
use serde_json::json;

/// Merging is off unless a test turns it on: only the merges a test asks for run.
fn args(extra: &[&str]) -> Vec<String> {
    let mut a = vec!["--merge-size".to_string(), "0".to_string()];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

async fn split(c: &Cluster, key: &str) {
    let id = start_split(c, 1, json!({ "key": key })).await;
    wait_done(c, id, secs(60)).await;
}

// ---------------------------------------------------------------------------
// 1. A merge under load, watched
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_under_load_keeps_every_acknowledged_write_and_every_watched_change() {
    // Capturing is held, so writes to the right range are forwarded into
    // the left shard for a while before the cutover.
    let opts = ClusterOpts { extra_args: args(&["--fault-hold", "merge.capturing=1500"]), ..Default::default() };
    let c = Cluster::start(3, opts).await;
    let ledger = Arc::new(Ledger::default());
    let keys: Vec<String> = (0..500).map(|i| format!("key/{i:04}")).collect();
    preload(&c, &ledger, &keys, 0).await;
    split(&c, "key/0250").await;
    let before = ranges(&c).await;
    assert_eq!(before.len(), 2, "{before:?}");
    let (left, right) = (before[0].clone(), before[1].clone());
    let groups_before = groups_per_node(&c).await;

    // A watch of the whole key space (both ranges) from before the merge:
    // it must go on through it, missing nothing.
    let client = Client::new(c.apis()).expect("client");
    let everything = WatchRequest { start: String::new(), end: None, ..WatchRequest::default() };
    let Watching { seen, task: watcher } = Watching::start(&client, everything).await;
    // Writers of watched keys ("w/..", in the right range; each key has
    // one writer), acknowledged (key, version) kept. The values are the
    // ledger's, so the scanners and the final checks take them in too.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashSet<(String, u64)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let (stop, acked, apis, http) = (stop.clone(), acked.clone(), c.apis(), Http::with_timeout(secs(5)));
        let ledger = ledger.clone();
        writers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("w/{:02}", (i * 7) % 40);
                let seq = ledger.next_seq();
                let sent = Instant::now();
                let r = http.put(&apis[i as usize % apis.len()], &key, &value_for(&key, seq), None).await;
                match r {
                    Ok(r) if r.status == 200 => {
                        let version = r.write_result().version;
                        ledger.ack(&key, seq, version, sent.elapsed());
                        acked.lock().unwrap().insert((key, version));
                    }
                    Ok(r) => ledger.maybe(&key, seq, format!("status {}", r.status)),
                    Err(_) => ledger.maybe(&key, seq, "no answer".into()),
                }
                i += 2;
            }
        }));
    }

    // (No full scanners here: the watched keys are not the load's. The
    // kill tests below scan throughout.)
    let load = Load::start(&c, &ledger, &keys, &c.ids(), 4, 2);
    let acks = ledger.ack_count();
    wait_until(secs(20), "writes before the merge", || async { ledger.ack_count() >= acks + 100 }).await;
    let t = Instant::now();
    let id = start_merge(&c, 2, left.range_id).await;
    let v = wait_done(&c, id, secs(60)).await;
    let took = t.elapsed();
    let at_done = ledger.ack_count();
    wait_until(secs(20), "more acknowledged writes after the merge", || async { ledger.ack_count() >= at_done + 100 })
        .await;
    load.stop().await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    println!("merge took {took:?}: {}", describe(&v));
    println!("load: {}", ledger.summary());
    ledger.assert_no_violations();

    // Writes to the right range went on while it was captured, and after.
    let entered = |p| v.op.entered(p).unwrap_or_else(|| panic!("no {p:?} in history: {}", describe(&v)));
    let in_right = |k: &str| right.contains(k);
    let during = ledger.acks_between(entered(Phase::Capturing), entered(Phase::Frozen), in_right);
    let after = ledger.acks_between(entered(Phase::Done), u64::MAX, in_right);
    println!("acks to the right range: {during} while capturing, {after} after done");
    assert!(during > 0 && after > 0, "writes to the merged range stopped: {during} during, {after} after");

    // One range of the left shard at a bumped epoch; the right shard gone,
    // its replicas deleted from every node.
    assert_merge_outcome(&c, &v, &left, &right).await;
    let rs = ranges(&c).await;
    assert_eq!(rs.len(), 1, "{rs:?}");
    assert_eq!((rs[0].start.as_str(), rs[0].end.as_deref(), rs[0].shard_id), ("", None, FIRST_SHARD));
    wait_until(secs(30), "every node to delete its replica of the right shard", || async {
        let now = groups_per_node(&c).await;
        groups_before.iter().all(|(n, g)| now.get(n) == Some(&(g - 1)))
    })
    .await;
    let p = &v.op.progress;
    // The right range's 250 keys, and the watched ones written by then.
    assert!(p.keys_copied >= 250 && p.keys_copied == p.keys_total, "backfill progress: {}", describe(&v));
    assert_eq!(metric_sum(&c, "cleave_merges_committed_total").await, 1.0);
    assert_eq!(metric_sum(&c, "cleave_merges_aborted_total").await, 0.0);

    // Every acknowledged write is there, through every node; a full scan
    // sees each key once, in order.
    for id in c.ids() {
        verify_ledger(&c, &ledger, id).await;
    }
    assert_eq!(verify_scan(&c, &ledger, 1, 37).await.len(), keys.len() + 40);

    // The watch saw every acknowledged write of its keys, before, during
    // and after the merge.
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "watched writes went through: {}", acked.len());
    wait_until(secs(30), "every acknowledged watched write is seen", || async {
        let seen: HashSet<(String, u64)> = seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                WatchEvent::Put { key, version, .. } => Some((key.clone(), *version)),
                _ => None,
            })
            .collect();
        acked.iter().all(|a| seen.contains(a))
    })
    .await;
    assert!(!watcher.is_finished(), "the watch ended");
    watcher.abort();
}

// ---------------------------------------------------------------------------
// 2. Kills at every phase
// ---------------------------------------------------------------------------

/// One cluster split into 11 ranges; five merges of fresh pairs, each held
/// in a phase in turn while the leader of `victims[i]` is killed and
/// restarted.
async fn kill_at_every_phase(victims: [Victim; 5]) {
    let hold = "merge.planned=1000,merge.created=1000,merge.capturing=1200,merge.frozen=800,merge.committed=1000";
    let opts = ClusterOpts { extra_args: args(&["--fault-hold", hold]), ..Default::default() };
    let started = Instant::now();
    let c = Cluster::start(3, opts).await;
    let ledger = Arc::new(Ledger::default());
    let letters = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"];
    let keys: Vec<String> = letters.iter().flat_map(|p| (0..15).map(move |i| format!("{p}/{i:02}"))).collect();
    preload(&c, &ledger, &keys, 0).await;
    for l in &letters[1..] {
        split(&c, l).await;
    }
    let mut outcomes = Vec::new();
    for (i, (phase, victim)) in PHASES.into_iter().zip(victims).enumerate() {
        let rs = ranges(&c).await;
        let (left, right) = (range_of(&rs, letters[2 * i + 1]).clone(), range_of(&rs, letters[2 * i + 2]).clone());
        let mut load = Load::start(&c, &ledger, &keys, &c.ids(), 2, 1);
        load.add_scanners(&c, &ledger, &keys, &c.ids(), 1);
        let acks = ledger.ack_count();
        wait_until(secs(20), "some writes before the merge", || async { ledger.ack_count() >= acks + 10 }).await;
        let t = Instant::now();
        let id = start_merge(&c, 1, left.range_id).await;
        wait_phase(&c, id, phase, secs(30)).await;
        let group = match victim {
            Victim::Source => right.shard_id,
            Victim::Target => left.shard_id,
            Victim::Meta => 0,
        };
        let node = c.wait_for_group_leader(group, None, secs(10)).await;
        let still = try_op(&c, id).await.map(|v| v.op.phase);
        c.kill(node);
        println!("op {id}: killed node {node} ({victim:?}, group {group}) in {phase:?} (just before: {still:?})");
        // Another replica takes over while the node is down (unless the
        // merge ended meanwhile: the right shard is then gone).
        wait_until(secs(20), format!("a new leader of group {group}, or op {id} ended"), || async {
            let ended = try_op(&c, id).await.is_some_and(|v| v.op.phase.is_terminal());
            ended || c.group_leader(group).await.is_some_and(|l| l != node)
        })
        .await;
        c.restart_and_wait(node).await;
        let v = wait_ended(&c, id, secs(60)).await;
        println!("op {id} ended after {:?}: {}", t.elapsed(), describe(&v));
        if v.op.entered(Phase::Committed).is_some() || still.is_some_and(|p| p >= Phase::Committed) {
            assert_eq!(v.op.phase, Phase::Done, "a committed merge must finish: {}", describe(&v));
        }
        let ended = v.op.history.last().map_or(u64::MAX, |h| h.1);
        let during = ledger.acks_between(v.op.history[0].1, ended, |_| true);
        load.stop().await;
        assert!(during > 0, "no write was acknowledged during op {id}");
        assert_merge_outcome(&c, &v, &left, &right).await;
        ledger.assert_no_violations();
        wait_all_shards_led(&c, secs(20)).await;
        verify_ledger(&c, &ledger, node).await;
        outcomes.push((phase, victim, v.op.phase));
    }
    println!("outcomes {outcomes:?} after {:?}; load: {}", started.elapsed(), ledger.summary());
    let done = outcomes.iter().filter(|o| o.2 == Phase::Done).count();
    assert!(done >= 3, "most merges should finish despite the kill: {outcomes:?}");
    assert_eq!(ranges(&c).await.len(), letters.len() - done);
    for id in c.ids() {
        verify_ledger(&c, &ledger, id).await;
    }
    verify_scan(&c, &ledger, 2, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_survives_kills_at_every_phase() {
    kill_at_every_phase([Victim::Source, Victim::Target, Victim::Meta, Victim::Source, Victim::Target]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_survives_other_kills_at_every_phase() {
    kill_at_every_phase([Victim::Meta, Victim::Source, Victim::Target, Victim::Meta, Victim::Source]).await;
}

// ---------------------------------------------------------------------------
// 3. Automatic merges, cancel, bad input
// ---------------------------------------------------------------------------

/// Two small idle ranges are merged by the rebalancer once their split
/// has cooled down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_idle_neighbours_are_merged_automatically() {
    let extra = ["--merge-size", "1048576", "--merge-cooldown", "3"].map(String::from).to_vec();
    let c = Cluster::start(3, ClusterOpts { extra_args: extra, ..Default::default() }).await;
    let ledger = Arc::new(Ledger::default());
    let keys: Vec<String> = (0..100).map(|i| format!("m/{i:03}")).collect();
    preload(&c, &ledger, &keys, 0).await;
    split(&c, "m/050").await;
    assert_eq!(ranges(&c).await.len(), 2);
    let merged = cleave_tests::wait_for(secs(60), "an automatic merge to finish", || async {
        let ops = c.http.admin_operations(&c.api(1)).await.ok()?;
        ops.into_iter().find(|v| matches!(v.op.kind, OpKind::Merge { .. }) && v.op.phase == Phase::Done)
    })
    .await;
    let OpKind::Merge { reason, .. } = &merged.op.kind else { unreachable!() };
    assert_eq!(reason, "size", "{}", describe(&merged));
    let rs = ranges(&c).await;
    assert_eq!(rs.len(), 1, "{rs:?}");
    for id in c.ids() {
        verify_ledger(&c, &ledger, id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_before_commit_leaves_both_ranges_and_the_data() {
    let opts = ClusterOpts { extra_args: args(&["--fault-hold", "merge.capturing=5000"]), ..Default::default() };
    let c = Cluster::start(3, opts).await;
    let ledger = Arc::new(Ledger::default());
    let keys: Vec<String> = (0..200).map(|i| format!("{}{i:03}", ["c", "x"][i % 2])).collect();
    preload(&c, &ledger, &keys, 0).await;
    split(&c, "m").await;
    let before = ranges(&c).await;
    let (left, right) = (before[0].clone(), before[1].clone());
    let load = Load::start(&c, &ledger, &keys, &c.ids(), 2, 1);
    let id = start_merge(&c, 1, left.range_id).await;
    wait_phase(&c, id, Phase::Capturing, secs(30)).await;
    let r = admin_post(&c, 2, &format!("/admin/operations/{id}/cancel"), &json!({})).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = wait_ended(&c, id, secs(30)).await;
    load.stop().await;
    assert_eq!(v.op.phase, Phase::Aborted, "{}", describe(&v));
    assert_merge_outcome(&c, &v, &left, &right).await;
    ledger.assert_no_violations();
    for id in c.ids() {
        verify_ledger(&c, &ledger, id).await;
    }
    // The left shard dropped what it had received: its figures are its own
    // 100 keys again (the load rewrites keys, it adds none).
    wait_until(secs(20), "the left shard to count its own keys only", || async {
        shards(&c).await.iter().any(|s| s.shard_id == left.shard_id && s.keys == Some(100))
    })
    .await;
    // The left shard kept nothing of the right range: a merge afterwards
    // counts the right range's keys once.
    let id = start_merge(&c, 1, left.range_id).await;
    let v = wait_done(&c, id, secs(60)).await;
    assert_merge_outcome(&c, &v, &left, &right).await;
    assert_eq!(verify_scan(&c, &ledger, 3, 50).await.len(), keys.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_merges_are_refused_with_a_message() {
    let opts = ClusterOpts { extra_args: args(&["--fault-hold", "merge.capturing=5000"]), ..Default::default() };
    let c = Cluster::start(3, opts).await;
    split(&c, "m").await;
    let rs = ranges(&c).await;
    let (left, right) = (rs[0].range_id, rs[1].range_id);
    let cases = [
        (json!({ "range_id": 999 }), 404, "no range 999"),
        (json!({ "range_id": right }), 400, "last"),
        (json!({}), 400, "range_id"),
        (json!({ "range_id": "one" }), 400, ""),
        (json!([1]), 400, ""),
    ];
    for (body, status, says) in cases {
        let r = admin_post(&c, 1, "/admin/merge", &body).await;
        assert_eq!(r.status, status, "{body}: {r:?}");
        let msg = r.value()["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains(says), "{body}: message {msg:?} should say {says:?}");
    }
    // Busy: a merge of the same pair while one runs, a split of either range.
    let id = start_merge(&c, 1, left).await;
    let r = admin_post(&c, 2, "/admin/merge", &json!({ "range_id": left })).await;
    assert_eq!(r.status, 409, "{r:?}");
    let r = admin_post(&c, 3, "/admin/split", &json!({ "key": "t" })).await;
    assert_eq!(r.status, 409, "{r:?}");
    let v = wait_done(&c, id, secs(60)).await;
    assert_eq!(ranges(&c).await.len(), 1, "{}", describe(&v));
    // One range left: nothing to merge it with.
    let r = admin_post(&c, 1, "/admin/merge", &json!({ "range_id": left })).await;
    assert_eq!(r.status, 400, "{r:?}");
}
