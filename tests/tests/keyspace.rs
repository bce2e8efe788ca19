//! Hash-spread keyspaces (`PUT /admin/keyspaces/{prefix}`): sequential
//! keys under a declared prefix land on many shards, while reads, writes,
//! CAS, transactions, scans (in key order, each key once, with paging) and
//! watches keep seeing plain keys; bad declarations are refused.

use std::collections::{BTreeMap, BTreeSet};

use cleave_client::{Client, WatchEvent, WatchRequest};
use cleave_tests::ops::{ranges, shards};
use cleave_tests::watching::Watching;
use cleave_tests::{secs, wait_until, Cluster, ClusterOpts, Resp};
use reqwest::Method;
use serde_json::{json, Value};

fn opts() -> ClusterOpts {
    ClusterOpts { extra_args: vec!["--merge-size".into(), "0".into()], ..Default::default() }
}

/// `PUT /admin/keyspaces/{prefix}` through node `via`, tried again while
/// the answer is transient (a cluster just started has no leader yet).
async fn declare(c: &Cluster, via: u64, prefix: &str, body: Value) -> Resp {
    let url = cleave_tests::Http::url(&c.api(via), &format!("/admin/keyspaces/{prefix}"));
    cleave_tests::wait_for(secs(60), format!("PUT /admin/keyspaces/{prefix} {body} to answer"), || async {
        let r = c.http.send(Method::PUT, url.clone(), Some(body.to_string())).await.ok()?;
        (!r.is_transient()).then_some(r)
    })
    .await
}

fn message(r: &Resp) -> String {
    r.value()["error"]["message"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_keys_under_a_keyspace_spread_over_its_buckets_and_read_as_plain_keys() {
    let c = Cluster::start(3, opts()).await;
    // Plain keys on both sides of the prefix.
    for k in ["a", "ev", "ev0", "z"] {
        c.put_ok(1, k, &json!(k)).await;
    }
    let r = declare(&c, 2, "ev/", json!({ "hash_buckets": 8 })).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.value(), json!({ "prefix": "ev/", "hash_buckets": 8, "active": true }));
    let listed = c.http.get_path(&c.api(3), "/admin/keyspaces").await.unwrap();
    assert_eq!(listed.value(), json!([{ "prefix": "ev/", "hash_buckets": 8, "active": true }]));
    // Declaring it again changes nothing.
    let again = declare(&c, 1, "ev/", json!({ "hash_buckets": 8 })).await;
    assert_eq!(again.status, 200, "{again:?}");
    let rs = ranges(&c).await;
    assert!(rs.len() >= 10, "8 buckets and the two ranges around them: {rs:?}");
    // The buckets: the ranges between two bounds under the prefix.
    let in_prefix = |k: Option<&str>| k.is_some_and(|k| k.starts_with("ev/"));
    let bucket_shards: BTreeSet<u64> =
        rs.iter().filter(|r| in_prefix(Some(&r.start)) && in_prefix(r.end.as_deref())).map(|r| r.shard_id).collect();
    assert_eq!(bucket_shards.len(), 8, "one shard per bucket: {rs:?}");

    // Sequential keys, through every node.
    let keys: Vec<String> = (0..400).map(|i| format!("ev/{i:06}")).collect();
    let mut versions = BTreeMap::new();
    for (i, k) in keys.iter().enumerate() {
        versions.insert(k.clone(), c.put_ok(1 + (i % 3) as u64, k, &json!({ "n": i })).await);
    }
    // They are spread: most buckets' shards hold some.
    wait_until(secs(30), "the buckets' shards to report their keys", || async {
        let holding = shards(&c)
            .await
            .iter()
            .filter(|s| bucket_shards.contains(&s.shard_id))
            .filter(|s| s.keys.unwrap_or(0) > 0)
            .count();
        holding >= 6
    })
    .await;
    // Read back as plain keys, from every node.
    for (i, k) in keys.iter().enumerate().step_by(37) {
        for via in c.ids() {
            let r = c.http.get(&c.api(via), k, None).await.unwrap();
            assert_eq!(r.status, 200, "{k}: {r:?}");
            assert_eq!(r.value()["key"], json!(k));
            assert_eq!(r.value()["value"], json!({ "n": i }));
        }
    }
    // CAS on a bucketed key.
    let k = &keys[5];
    let stale = c.http.put(&c.api(2), k, &json!("x"), Some(versions[k] + 7)).await.unwrap();
    assert_eq!(stale.status, 409, "{stale:?}");
    let ok = c.http.put(&c.api(2), k, &json!("cas"), Some(versions[k])).await.unwrap();
    assert_eq!((ok.status, ok.value()["key"].clone()), (200, json!(k)), "{ok:?}");

    // A scan of the prefix: every key once, in key order, paged.
    let items = c.http.scan_all(&c.api(3), Some("ev/"), Some("ev0"), 37).await;
    let got: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(got, keys.iter().map(String::as_str).collect::<Vec<_>>());
    // A scan of everything: the plain keys around the keyspace too.
    let items = c.http.scan_all(&c.api(1), None, None, 50).await;
    let got: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
    let mut want: Vec<&str> = vec!["a", "ev"];
    want.extend(keys.iter().map(String::as_str));
    want.extend(["ev0", "z"]);
    assert_eq!(got, want);
    // A scan inside the keyspace.
    let items = c.http.scan_all(&c.api(2), Some("ev/000100"), Some("ev/000110"), 3).await;
    let got: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(got, keys[100..110].iter().map(String::as_str).collect::<Vec<_>>());

    // A transaction over keys in two buckets answers with plain keys.
    let (k1, k2) = (&keys[1], &keys[2]);
    let body = json!({
        "compare": [{ "key": k1, "version": versions[k1] }],
        "success": [{ "op": "put", "key": k2, "value": 7 }, { "op": "get", "key": k1 }],
        "failure": []
    });
    let r = c.http.txn(&c.api(1), &body).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.value();
    assert_eq!(v["succeeded"], json!(true), "{v}");
    assert_eq!((v["results"][0]["key"].clone(), v["results"][1]["key"].clone()), (json!(k2), json!(k1)));
    let r = c.http.get(&c.api(3), k2, None).await.unwrap();
    assert_eq!(r.value()["value"], json!(7));

    // A watch of part of the keyspace sees its keys, as plain keys, only.
    let client = Client::new(c.apis()).expect("client");
    let w = Watching::start(&client, WatchRequest::prefix("ev/0003")).await;
    for k in ["ev/000299", "ev/000300", "ev/000301", "ev/000400"] {
        c.put_ok(2, k, &json!("w")).await;
    }
    wait_until(secs(20), "the watch to see the two keys under its prefix", || async {
        let puts = w.seen.lock().unwrap().iter().filter(|e| matches!(e, WatchEvent::Put { .. })).count();
        puts >= 2
    })
    .await;
    let seen: Vec<String> = w
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Put { key, .. } => Some(key.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(seen, vec!["ev/000300".to_string(), "ev/000301".to_string()]);
    w.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_declarations_and_reserved_keys_are_refused_with_a_message() {
    let c = Cluster::start(3, opts()).await;
    c.put_ok(1, "data/x", &json!(1)).await;
    let r = declare(&c, 1, "data/", json!({ "hash_buckets": 4 })).await;
    assert_eq!(r.status, 409, "declaring over data: {r:?}");
    assert!(message(&r).contains("data/x"), "{r:?}");
    for (body, status) in [
        (json!({ "hash_buckets": 1 }), 400),
        (json!({ "hash_buckets": 257 }), 400),
        (json!({}), 400),
        (json!({ "hash_buckets": "eight" }), 400),
        (json!([4]), 400),
    ] {
        let r = declare(&c, 2, "ev/", body.clone()).await;
        assert_eq!(r.status, status, "{body}: {r:?}");
        assert!(!message(&r).is_empty(), "{body}: {r:?}");
    }
    let r = declare(&c, 2, "ev/", json!({ "hash_buckets": 4 })).await;
    assert_eq!(r.status, 200, "{r:?}");
    for overlapping in ["ev/sub/", "e"] {
        let r = declare(&c, 3, overlapping, json!({ "hash_buckets": 4 })).await;
        assert_eq!(r.status, 409, "{overlapping}: {r:?}");
        assert!(message(&r).contains("overlaps"), "{r:?}");
    }
    let r = declare(&c, 3, "ev/", json!({ "hash_buckets": 8 })).await;
    assert_eq!(r.status, 409, "the same prefix with other buckets: {r:?}");
    // A key that cannot be told apart from a bucketed one.
    let r = c.http.put(&c.api(1), "ev/\u{F0001}x", &json!(1), None).await.unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    let r = c.http.get(&c.api(1), "ev/\u{F0001}x", None).await.unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    let listed = c.http.get_path(&c.api(1), "/admin/keyspaces").await.unwrap();
    assert_eq!(listed.value(), json!([{ "prefix": "ev/", "hash_buckets": 4, "active": true }]));
}

/// A watch opened before a declaration over its keys ends with an error
/// line, so that it is resumed over the keyspace; the Rust client resumes
/// it by itself and sees writes to the keys in their buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_opened_before_a_declaration_over_its_keys_follows_them_into_the_buckets() {
    let c = Cluster::start(3, opts()).await;
    let client = Client::new(c.apis()).expect("client");
    // Part of the prefix: its keys' bucketed forms lie outside the span.
    let w = Watching::start(&client, WatchRequest::prefix("ev/1")).await;
    let r = declare(&c, 1, "ev/", json!({ "hash_buckets": 4 })).await;
    assert_eq!(r.status, 200, "{r:?}");
    for k in ["ev/1a", "ev/2", "ev/1b", "ev/1c", "ev/3"] {
        c.put_ok(2, k, &json!("after")).await;
    }
    wait_until(secs(30), "the watch to see the writes made after the declaration", || async {
        let seen = w.seen.lock().unwrap();
        let keys: BTreeSet<&str> = seen
            .iter()
            .filter_map(|e| match e {
                WatchEvent::Put { key, .. } => Some(key.as_str()),
                _ => None,
            })
            .collect();
        keys == BTreeSet::from(["ev/1a", "ev/1b", "ev/1c"])
    })
    .await;
    assert!(!w.task.is_finished(), "the watch goes on");
    w.task.abort();
}
