//! Compare-and-set (`if_version`) under contention, through every node of a
//! 3-node cluster.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cleave_tests::{secs, value_of, Cluster, ClusterOpts, ErrorCode, Http};
use serde_json::json;

const TASKS: usize = 6;
const TARGET_SUCCESSES: usize = 500;
const RUN_FOR: Duration = Duration::from_secs(10);

#[derive(Default)]
struct TaskLog {
    /// (version won, value written)
    wins: Vec<(u64, serde_json::Value)>,
    conflicts: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_read_then_cas_has_exactly_one_winner_per_version() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let key = "cas/counter";
    let started = Instant::now();
    let total = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let api = c.api(c.ids()[t % 3]);
        let http: Http = c.http.clone();
        let total = total.clone();
        tasks.push(tokio::spawn(async move {
            let mut log = TaskLog::default();
            let mut n = 0u64;
            while started.elapsed() < RUN_FOR && total.load(std::sync::atomic::Ordering::SeqCst) < TARGET_SUCCESSES {
                // Read the current version (0 = absent)…
                let r = http.get(&api, key, Some("linearizable")).await.expect("GET");
                let seen = match r.status {
                    200 => r.item().version,
                    404 => {
                        assert_eq!(r.error().error.code, ErrorCode::NotFound);
                        0
                    }
                    _ => panic!("task {t}: unexpected answer to GET: {r:?}"),
                };
                // …and write only if nobody wrote in between.
                n += 1;
                let value = json!({"task": t, "n": n});
                let r = http.put(&api, key, &value, Some(seen)).await.expect("PUT");
                match r.status {
                    200 => {
                        let w = r.write_result();
                        assert_eq!(w.version, seen + 1, "task {t}: CAS from version {seen} succeeded: {r:?}");
                        log.wins.push((w.version, value));
                        total.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    409 => {
                        let e = r.expect_error(409, ErrorCode::VersionConflict);
                        let current = e.error.version.unwrap_or_else(|| panic!("409 without a version: {r:?}"));
                        assert!(current > seen, "task {t}: conflict on version {seen} but current is {current}: {r:?}");
                        log.conflicts += 1;
                    }
                    _ => panic!("task {t}: unexpected answer to a CAS write: {r:?}"),
                }
            }
            log
        }));
    }

    let mut winners: BTreeMap<u64, (usize, serde_json::Value)> = BTreeMap::new();
    let mut conflicts = 0;
    for (t, task) in tasks.into_iter().enumerate() {
        let log = task.await.expect("CAS task panicked");
        conflicts += log.conflicts;
        for (version, value) in log.wins {
            if let Some((other, _)) = winners.insert(version, (t, value)) {
                panic!("version {version} was won by both task {other} and task {t}");
            }
        }
    }
    let successes = winners.len() as u64;
    println!("{successes} successful CAS writes, {conflicts} conflicts in {:?}", started.elapsed());
    assert!(successes >= 20, "too few successful CAS writes to mean anything: {successes}");
    assert!(conflicts > 0, "{TASKS} tasks racing on one key never conflicted");
    let versions: Vec<u64> = winners.keys().copied().collect();
    assert_eq!(versions, (1..=successes).collect::<Vec<_>>(), "won versions must be exactly 1..=N");

    // The key's final state is the last winner's write, at version N, on
    // every node.
    let (_, last_value) = &winners[&successes];
    for id in c.ids() {
        let item = c.read_retry(id, key, Some("linearizable"), secs(10)).await.item();
        assert_eq!(item.version, successes, "final version through node {id}");
        assert_eq!(&value_of(&item), last_value, "final value through node {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_if_absent_and_conditional_delete() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let key = "cas/create";

    // Many concurrent "create if absent" (if_version 0): exactly one wins.
    let mut tasks = Vec::new();
    for t in 0..9usize {
        let (api, http) = (c.api(c.ids()[t % 3]), c.http.clone());
        tasks.push(tokio::spawn(async move { (t, http.put(&api, key, &json!({"creator": t}), Some(0)).await) }));
    }
    let mut winner = None;
    for task in tasks {
        let (t, r) = task.await.expect("task");
        let r = r.expect("PUT");
        match r.status {
            200 => {
                assert_eq!(r.write_result().version, 1);
                assert!(winner.replace(t).is_none(), "two creators won");
            }
            409 => {
                let e = r.expect_error(409, ErrorCode::VersionConflict);
                assert_eq!(e.error.version, Some(1), "conflict must report the current version: {r:?}");
            }
            _ => panic!("unexpected answer to create-if-absent: {r:?}"),
        }
    }
    let winner = winner.expect("one creator must win");
    let item = c.read_retry(2, key, None, secs(5)).await.item();
    assert_eq!((value_of(&item), item.version), (json!({"creator": winner}), 1));

    // A wrong if_version on a write or delete changes nothing.
    let api = c.api(3);
    let r = c.http.put(&api, key, &json!("stale"), Some(7)).await.expect("PUT");
    assert_eq!(r.expect_error(409, ErrorCode::VersionConflict).error.version, Some(1));
    let r = c.http.delete(&api, key, Some(2)).await.expect("DELETE");
    assert_eq!(r.expect_error(409, ErrorCode::VersionConflict).error.version, Some(1));
    let item = c.read_retry(1, key, None, secs(5)).await.item();
    assert_eq!((value_of(&item), item.version), (json!({"creator": winner}), 1));

    // The right ones apply.
    let r = c.http.put(&api, key, &json!("second"), Some(1)).await.expect("PUT");
    assert_eq!(r.write_result().version, 2);
    let r = c.http.delete(&api, key, Some(2)).await.expect("DELETE");
    assert_eq!(r.write_result().key, key);
    let r = c.read_retry(1, key, None, secs(5)).await;
    r.expect_error(404, ErrorCode::NotFound);
    // A delete of an absent key is a 404; "create if absent" works again.
    c.http.delete(&api, key, None).await.expect("DELETE").expect_error(404, ErrorCode::NotFound);
    let r = c.http.put(&api, key, &json!("again"), Some(0)).await.expect("PUT");
    assert_eq!(r.write_result().key, key);
    let item = c.read_retry(2, key, None, secs(5)).await.item();
    assert_eq!(value_of(&item), json!("again"));
}
