//! Transactions across shards (`POST /v1/txn`): the bank invariant under
//! node kills, a coordinator killed before and after its commit point,
//! conflicting transactions, a range holding locks that splits, and bad
//! bodies.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use cleave_tests::ops::{range_of, ranges, start_split, wait_done};
use cleave_tests::{secs, wait_for, wait_until, Cluster, ClusterOpts, Http, NodeId, Resp};
use serde_json::{json, Value};

const ACCOUNTS: usize = 8;
const TOTAL: i64 = 100 * ACCOUNTS as i64;

fn acct(i: usize) -> String {
    format!("acct/{i}")
}

/// Splits the key space at each of `keys`, one after the other.
async fn split_at(c: &Cluster, keys: &[&str]) {
    for key in keys {
        let id = start_split(c, 1, json!({ "key": key })).await;
        wait_done(c, id, secs(60)).await;
    }
}

/// Posts `body` through `via` until an answer other than "not applied,
/// retry" (503) comes back.
async fn txn_ok(c: &Cluster, via: NodeId, body: &Value) -> Value {
    let r = wait_for(secs(30), format_args!("txn {body} through node {via}"), || async {
        let r = c.http.txn(&c.api(via), body).await.ok()?;
        (r.status != 503).then_some(r)
    })
    .await;
    assert_eq!(r.status, 200, "txn {body}: {r:?}");
    r.value()
}

/// A read-only transaction of every account: `(sum, [(version, balance)])`.
fn read_all() -> Value {
    json!({ "success": (0..ACCOUNTS).map(|i| json!({"op": "get", "key": acct(i)})).collect::<Vec<_>>() })
}

fn balances(v: &Value) -> Vec<(u64, i64)> {
    v["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| (r["version"].as_u64().expect("version"), r["value"].as_i64().expect("balance")))
        .collect()
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bank_transfers_keep_the_total_through_node_kills() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    split_at(&c, &["acct/3", "acct/6"]).await;
    let open: Vec<Value> = (0..ACCOUNTS).map(|i| json!({"op": "put", "key": acct(i), "value": 100})).collect();
    let compare: Vec<Value> = (0..ACCOUNTS).map(|i| json!({"key": acct(i), "version": 0})).collect();
    let v = txn_ok(&c, 1, &json!({"compare": compare, "success": open})).await;
    assert_eq!(v["succeeded"], true, "{v}");

    let stop = Arc::new(AtomicBool::new(false));
    let (transfers, reads, unknown) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let apis = c.apis();
    let mut tasks = Vec::new();
    for t in 0..3u64 {
        let (http, apis, stop, transfers, unknown) =
            (c.http.clone(), apis.clone(), stop.clone(), transfers.clone(), unknown.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9 + t);
            let mut n = t as usize;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let api = &apis[n % apis.len()];
                let (from, to) = (rng.below(ACCOUNTS as u64) as usize, rng.below(ACCOUNTS as u64) as usize);
                if from == to {
                    continue;
                }
                let read = json!({"success": [{"op": "get", "key": acct(from)}, {"op": "get", "key": acct(to)}]});
                let Some(r) = http.txn(api, &read).await.ok().filter(Resp::is_success) else { continue };
                let b = balances(&r.value());
                let amount = 1 + rng.below(10) as i64;
                let transfer = json!({
                    "compare": [{"key": acct(from), "version": b[0].0}, {"key": acct(to), "version": b[1].0}],
                    "success": [{"op": "put", "key": acct(from), "value": b[0].1 - amount},
                                {"op": "put", "key": acct(to), "value": b[1].1 + amount}],
                });
                match http.txn(api, &transfer).await {
                    Ok(r) if r.status == 200 => {
                        if r.value()["succeeded"] == true {
                            transfers.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Ok(r) if r.status == 503 => {}
                    // A lost answer (the node died under it, or 504): the
                    // transfer happened or did not, wholly.
                    Ok(r) if r.status == 504 => _ = unknown.fetch_add(1, Ordering::SeqCst),
                    Err(_) => _ = unknown.fetch_add(1, Ordering::SeqCst),
                    Ok(r) => panic!("transfer {transfer}: {r:?}"),
                }
            }
        }));
    }
    for t in 0..2usize {
        let (http, apis, stop, reads) = (c.http.clone(), apis.clone(), stop.clone(), reads.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = t;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let Ok(r) = http.txn(&apis[n % apis.len()], &read_all()).await else { continue };
                match r.status {
                    200 => {
                        let sum: i64 = balances(&r.value()).iter().map(|(_, b)| b).sum();
                        assert_eq!(sum, TOTAL, "a read-only transaction saw {}", r.body);
                        reads.fetch_add(1, Ordering::SeqCst);
                    }
                    503 | 504 => {}
                    _ => panic!("read-only txn: {r:?}"),
                }
            }
        }));
    }

    // Kill the leader of the shard of the transactions' primary key, then
    // that of the last accounts' shard: each time, commits in flight lose
    // their coordinator or their shard's leader.
    for account in [0, ACCOUNTS - 1] {
        let shard = range_of(&ranges(&c).await, &acct(account)).shard_id;
        let victim = c.wait_for_leader(shard, secs(10)).await;
        let before = transfers.load(Ordering::SeqCst);
        wait_until(secs(30), "transfers before the kill", || async { transfers.load(Ordering::SeqCst) >= before + 20 })
            .await;
        c.kill(victim);
        let at_kill = transfers.load(Ordering::SeqCst);
        let reads_at_kill = reads.load(Ordering::SeqCst);
        wait_until(secs(60), format!("transfers and reads with node {victim} dead"), || async {
            transfers.load(Ordering::SeqCst) >= at_kill + 30 && reads.load(Ordering::SeqCst) >= reads_at_kill + 10
        })
        .await;
        c.restart_and_wait(victim).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.expect("a task panicked");
    }
    let v = txn_ok(&c, 1, &read_all()).await;
    let sum: i64 = balances(&v).iter().map(|(_, b)| b).sum();
    println!(
        "transfers {}, read-only txns {}, outcomes unknown {}; final {v}",
        transfers.load(Ordering::SeqCst),
        reads.load(Ordering::SeqCst),
        unknown.load(Ordering::SeqCst)
    );
    assert_eq!(sum, TOTAL, "final balances {v}");
    assert!(reads.load(Ordering::SeqCst) > 0, "no read-only transaction got through");
    // Every single-key read agrees with the last transaction's view.
    for (i, (version, balance)) in balances(&v).into_iter().enumerate() {
        let item = c.read_retry(1, &acct(i), Some("linearizable"), secs(10)).await.item();
        assert_eq!((item.version, cleave_tests::value_of(&item)), (version, json!(balance)));
    }
}

/// Starts `body` through node `via`, whose coordinator holds it at a fault
/// point; answers once the hold is reached.
async fn held_txn(c: &Cluster, via: NodeId, body: Value) -> tokio::task::JoinHandle<anyhow::Result<Resp>> {
    let (http, api) = (Http::with_timeout(secs(120)), c.api(via));
    let task = tokio::spawn(async move { http.txn(&api, &body).await });
    wait_until(secs(30), "the transaction to reach its hold", || async {
        c.metric(via, "cleave_txn_fault_held_total").await >= 1.0
    })
    .await;
    task
}

fn hold_on_node_3(point: &str) -> ClusterOpts {
    ClusterOpts { node_args: vec![(3, vec!["--fault-hold".into(), format!("{point}=120000")])], ..Default::default() }
}

/// A cluster of two shards where "a" and "z" held "old a" and "old z" when
/// a transaction writing "new a" and "new z" (primary "a") was held at
/// `point` on its coordinator, node 3, and node 3 was killed.
async fn coordinator_killed_at(point: &str) -> Cluster {
    let c = Cluster::start(3, hold_on_node_3(point)).await;
    split_at(&c, &["m"]).await;
    c.put_ok(1, "a", &json!("old a")).await;
    c.put_ok(1, "z", &json!("old z")).await;
    let body =
        json!({"success": [{"op": "put", "key": "a", "value": "new a"}, {"op": "put", "key": "z", "value": "new z"}]});
    let task = held_txn(&c, 3, body).await;
    c.kill(3);
    assert!(task.await.unwrap().is_err(), "the coordinator died: no answer");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_before_its_commit_leaves_every_key_untouched() {
    let c = coordinator_killed_at("txn_locked").await;
    // Its locks expire and whoever meets them rolls the transaction back:
    // a write to each key goes through, over the old value.
    for key in ["a", "z"] {
        let item = c.read_retry(1, key, Some("linearizable"), secs(10)).await.item();
        assert_eq!(cleave_tests::value_of(&item), json!(format!("old {key}")), "{key}");
        let r = c.http.put(&c.api(1), key, &json!("after"), Some(item.version)).await.unwrap();
        assert_eq!(r.write_result().version, item.version + 1, "{key}: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_after_its_commit_leaves_every_key_written() {
    let c = coordinator_killed_at("txn_committed").await;
    // Committed at its primary ("a"): a reader of the other key finishes it.
    for key in ["z", "a"] {
        let item = c.read_retry(1, key, Some("linearizable"), secs(10)).await.item();
        assert_eq!(cleave_tests::value_of(&item), json!(format!("new {key}")), "{key}");
        assert_eq!(item.version, 2, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_holding_locks_splits_and_the_transaction_still_lands() {
    let c = Cluster::start(3, hold_on_node_3("txn_committed")).await;
    split_at(&c, &["m"]).await;
    for key in ["a", "t", "x"] {
        c.put_ok(1, key, &json!(0)).await;
    }
    // Primary "a"; "t" and "x" are locked on the second shard when the
    // commit point passes and the coordinator stops.
    let body = json!({"success": [{"op": "put", "key": "a", "value": 1}, {"op": "put", "key": "t", "value": 1},
                                  {"op": "put", "key": "x", "value": 1}]});
    let task = held_txn(&c, 3, body).await;
    // Split the locked range between its two locked keys: the locks must
    // go with the data, or the writes would be lost.
    split_at(&c, &["w"]).await;
    c.kill(3);
    assert!(task.await.unwrap().is_err());
    for key in ["x", "t", "a"] {
        let item = c.read_retry(1, key, Some("linearizable"), secs(10)).await.item();
        assert_eq!((cleave_tests::value_of(&item), item.version), (json!(1), 2), "{key}");
    }
}

/// Transactions that add 1 to "c" and "x" together, single-key
/// compare-and-set writes that add 1 to "c" alone, and linearizable reads
/// of "c", all at once, while both ranges split under them (their locks
/// change records that the splits are copying): no increment is lost or
/// made twice, reads never go backwards, and every split completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transactions_single_key_writes_and_splits_interleave() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    split_at(&c, &["m"]).await;
    c.put_ok(1, "c", &json!(0)).await;
    c.put_ok(1, "x", &json!(0)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let apis = c.apis();
    let mut txns = Vec::new();
    for t in 0..2usize {
        let (http, apis, stop) = (c.http.clone(), apis.clone(), stop.clone());
        txns.push(tokio::spawn(async move {
            let (mut done, mut n) = (0u64, t);
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let api = &apis[n % apis.len()];
                let read = json!({"success": [{"op": "get", "key": "c"}, {"op": "get", "key": "x"}]});
                let r = http.txn(api, &read).await.expect("read txn");
                if r.status == 503 {
                    continue;
                }
                assert_eq!(r.status, 200, "{r:?}");
                let b = balances(&r.value());
                let add = json!({
                    "compare": [{"key": "c", "version": b[0].0}, {"key": "x", "version": b[1].0}],
                    "success": [{"op": "put", "key": "c", "value": b[0].1 + 1},
                                {"op": "put", "key": "x", "value": b[1].1 + 1}],
                });
                let r = http.txn(api, &add).await.expect("txn");
                match r.status {
                    200 => done += u64::from(r.value()["succeeded"] == true),
                    503 => {}
                    _ => panic!("{add}: {r:?}"),
                }
            }
            done
        }));
    }
    let single = {
        let (http, apis, stop) = (c.http.clone(), apis.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut done, mut n, mut seen) = (0u64, 0usize, 0i64);
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let api = &apis[n % apis.len()];
                let r = http.get(api, "c", Some("linearizable")).await.expect("get");
                if r.status == 503 {
                    continue;
                }
                let item = r.item();
                let now = cleave_tests::value_of(&item).as_i64().expect("a number");
                assert!(now >= seen, "a linearizable read went back from {seen} to {now}");
                seen = now;
                let r = http.put(api, "c", &json!(now + 1), Some(item.version)).await.expect("cas");
                match r.status {
                    200 => done += 1,
                    409 | 503 => {}
                    _ => panic!("cas of c: {r:?}"),
                }
            }
            done
        })
    };
    // Both ranges split while all that goes on: "c" and "x" move.
    wait_for(secs(30), "some transactions to commit", || async {
        let r = c.http.get(&c.api(1), "x", Some("linearizable")).await.ok()?;
        (r.status == 200 && cleave_tests::value_of(&r.item()).as_i64()? >= 5).then_some(())
    })
    .await;
    split_at(&c, &["b", "p"]).await;
    stop.store(true, Ordering::SeqCst);
    let mut by_txn = 0;
    for t in txns {
        by_txn += t.await.expect("txn task");
    }
    let by_cas = single.await.expect("cas task");
    assert!(by_txn > 0 && by_cas > 0, "both kinds of writes ran: {by_txn} / {by_cas}");
    let read = |key: &'static str| {
        let c = &c;
        async move { cleave_tests::value_of(&c.read_retry(2, key, Some("linearizable"), secs(10)).await.item()) }
    };
    assert_eq!(read("x").await, json!(by_txn), "every committed transaction once");
    assert_eq!(read("c").await, json!(by_txn + by_cas), "every write to c once, whichever way it came");
    let rs = ranges(&c).await;
    for key in ["c", "x"] {
        let r = range_of(&rs, key);
        assert!(r.start.as_str() == "b" || r.start.as_str() == "p", "{key} is in a split-off range: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_conflicting_transactions_exactly_one_wins() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    split_at(&c, &["m"]).await;
    for round in 0..10 {
        let (a, z) = (format!("a{round}"), format!("z{round}"));
        let create = |who: &str| {
            json!({"compare": [{"key": a, "version": 0}, {"key": z, "version": 0}],
                   "success": [{"op": "put", "key": a, "value": who}, {"op": "put", "key": z, "value": who}],
                   "failure": [{"op": "get", "key": a}]})
        };
        let (b1, b2) = (create("one"), create("two"));
        let (r1, r2) = tokio::join!(txn_ok(&c, 1, &b1), txn_ok(&c, 2, &b2));
        let won: Vec<bool> = [&r1, &r2].iter().map(|r| r["succeeded"] == true).collect();
        assert_eq!(won.iter().filter(|w| **w).count(), 1, "round {round}: {r1} / {r2}");
        let winner = if won[0] { "one" } else { "two" };
        let loser = if won[0] { &r2 } else { &r1 };
        assert_eq!(loser["results"][0]["value"], json!(winner), "the loser's failure branch read the winner's write");
        for key in [&a, &z] {
            let item = c.read_retry(1, key, Some("linearizable"), secs(10)).await.item();
            assert_eq!(cleave_tests::value_of(&item), json!(winner), "{key}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_results_follow_the_contract() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    split_at(&c, &["m"]).await;
    c.put_ok(1, "acct/1", &json!(100)).await;
    c.put_ok(1, "acct/3", &json!(5)).await;
    c.put_ok(1, "x/5", &json!({"n": 1})).await;
    let body = json!({
        "compare": [{"key": "acct/1", "version": 1}, {"key": "zz/9", "version": 0}],
        "success": [{"op": "put", "key": "acct/1", "value": 90}, {"op": "put", "key": "zz/9", "value": 10},
                    {"op": "get", "key": "x/5"}, {"op": "delete", "key": "acct/3"}, {"op": "get", "key": "nope"}],
        "failure": [{"op": "get", "key": "acct/1"}]});
    let v = txn_ok(&c, 2, &body).await;
    assert_eq!(
        v,
        json!({"succeeded": true, "results": [
            {"key": "acct/1", "version": 2}, {"key": "zz/9", "version": 1},
            {"key": "x/5", "value": {"n": 1}, "version": 1}, {"key": "acct/3", "version": 2},
            {"key": "nope", "found": false}]})
    );
    let v = txn_ok(&c, 3, &body).await;
    assert_eq!(v, json!({"succeeded": false, "results": [{"key": "acct/1", "value": 90, "version": 2}]}));
    assert_eq!(c.http.get(&c.api(1), "acct/3", None).await.unwrap().status, 404, "deleted by the transaction");
    // All on one shard: the same, in one entry.
    let one =
        json!({"compare": [{"key": "acct/1", "version": 2}], "success": [{"op": "put", "key": "acct/1", "value": 1}]});
    assert_eq!(txn_ok(&c, 1, &one).await, json!({"succeeded": true, "results": [{"key": "acct/1", "version": 3}]}));
    // Nothing at all is a transaction too.
    assert_eq!(txn_ok(&c, 1, &json!({})).await, json!({"succeeded": true, "results": []}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_transaction_bodies_get_a_json_4xx() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let api = c.api(1);
    let long = "k".repeat(5000);
    let many: Vec<Value> = (0..129).map(|i| json!({"op": "get", "key": format!("k{i}")})).collect();
    let cases: Vec<(String, u16)> = vec![
        ("not json".into(), 400),
        ("[1]".into(), 400),
        (json!({"success": [{"op": "put", "key": "k"}]}).to_string(), 400),
        (json!({"success": [{"op": "get", "key": "k", "value": 1}]}).to_string(), 400),
        (json!({"success": [{"op": "frob", "key": "k"}]}).to_string(), 400),
        (json!({"success": [{"op": "get", "key": ""}]}).to_string(), 400),
        (json!({"compare": [{"key": "k"}]}).to_string(), 400),
        (json!({"compare": [{"key": "k", "version": -1}]}).to_string(), 400),
        (json!({"success": [], "extra": 1}).to_string(), 400),
        (json!({"success": [{"op": "put", "key": "k", "value": 1}, {"op": "delete", "key": "k"}]}).to_string(), 400),
        (json!({"success": [{"op": "get", "key": long}]}).to_string(), 413),
        (json!({"success": many}).to_string(), 413),
        (
            format!("{{\"success\": [{{\"op\": \"put\", \"key\": \"k\", \"value\": \"{}\"}}]}}", "v".repeat(2 << 20)),
            413,
        ),
    ];
    for (body, status) in cases {
        let r = c.http.send(reqwest::Method::POST, Http::url(&api, "/v1/txn"), Some(body.clone())).await.unwrap();
        let shown = &body[..body.len().min(80)];
        assert_eq!(r.status, status, "{shown}: {r:?}");
        let e = r.error();
        assert!(!e.error.message.is_empty(), "{shown}: {r:?}");
    }
    assert!(c.http.get(&api, "k", None).await.unwrap().status == 404, "nothing was written");
}
