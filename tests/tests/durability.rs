//! Acknowledged writes survive SIGKILL of every node followed by a restart
//! from the same data directories.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cleave_tests::{secs, wait_until, Cluster, ClusterOpts, Http, Model, NodeId};
use serde_json::{json, Value};

/// Writes, overwrites and deletes through every node, then keeps writers
/// running while every node is SIGKILLed; after a restart, every
/// acknowledged operation must be visible with the acknowledged version.
async fn acknowledged_writes_survive_kill_all(n: usize) {
    let c = Cluster::start(n, ClusterOpts::default()).await;
    let ids = c.ids();
    let via = |i: usize| -> NodeId { ids[i % ids.len()] };
    let mut model = Model::new();

    // Phase 1: first writes (version 1), overwrites (versions 2, 3), deletes.
    for i in 0..60 {
        let key = format!("d/{i:03}");
        let value = json!({"i": i, "round": 1, "text": format!("value {i}")});
        assert_eq!(c.put_ok(via(i), &key, &value).await, 1, "first write of {key} must be version 1");
        model.put(key, value, 1);
    }
    for i in (0..60).step_by(3) {
        let key = format!("d/{i:03}");
        for round in 2..=3u64 {
            let value = json!({"i": i, "round": round});
            assert_eq!(c.put_ok(via(i + round as usize), &key, &value).await, round, "write #{round} of {key}");
            model.put(key.clone(), value, round);
        }
    }
    for i in (1..60).step_by(7) {
        let key = format!("d/{i:03}");
        let r = c.http.delete(&c.api(via(i)), &key, None).await.expect("DELETE");
        let w = r.write_result();
        assert_eq!(w.key, key);
        model.delete(key);
    }

    // Phase 2: writers in flight at the moment of the SIGKILL.
    let acked: Arc<Mutex<Vec<(String, Value, u64)>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let http = Http::with_timeout(Duration::from_secs(3));
    let mut tasks = Vec::new();
    for t in 0..4usize {
        let (acked, count, stop, http) = (acked.clone(), count.clone(), stop.clone(), http.clone());
        let api = c.api(via(t));
        tasks.push(tokio::spawn(async move {
            for seq in 0..100_000u64 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let key = format!("w/{t}/{seq:06}");
                let value = json!({"writer": t, "seq": seq});
                match http.put(&api, &key, &value, None).await {
                    Ok(r) if r.status == 200 => {
                        let w = r.write_result();
                        assert_eq!(w.key, key);
                        acked.lock().unwrap().push((key, value, w.version));
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    // Before the kill every write must succeed; after it,
                    // anything goes and the outcome is unknown.
                    Ok(r) if !stop.load(Ordering::SeqCst) => panic!("write of {key} failed before the kill: {r:?}"),
                    Err(e) if !stop.load(Ordering::SeqCst) => panic!("write of {key} failed before the kill: {e:#}"),
                    _ => break,
                }
            }
        }));
    }
    wait_until(secs(30), "80 acknowledged in-flight writes", || async { count.load(Ordering::SeqCst) >= 80 }).await;
    stop.store(true, Ordering::SeqCst);
    c.kill_all();
    for t in tasks {
        t.await.expect("writer task panicked");
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    println!("{n}-node cluster: {} operations in phase 1, {} writes acknowledged in flight", model.len(), acked.len());
    for (key, value, version) in acked {
        assert_eq!(version, 1, "first write of {key} must be version 1");
        model.put(key, value, version);
    }

    // Restart every node from its data dir; everything acknowledged is there.
    c.restart_all().await;
    for &id in &ids {
        model.assert_on(&c, id, "linearizable", secs(15)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_acknowledged_writes_survive_sigkill() {
    acknowledged_writes_survive_kill_all(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_acknowledged_writes_survive_sigkill_of_all() {
    acknowledged_writes_survive_kill_all(3).await;
}
