//! `GET /v1/watch`: every acknowledged write seen exactly once and in
//! per-key order while the range splits twice and a node dies; a resume
//! after a disconnect, at another node, that misses nothing and repeats
//! nothing; `410 compacted` for a cursor whose history was trimmed; a
//! watcher that does not read is cut off; a thousand watchers on one node;
//! a transaction's writes on two shards side by side.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cleave_client::{Client, WatchEvent, WatchRequest};
use cleave_tests::ops::{start_split, wait_done};
use cleave_tests::watching::Watching;
use cleave_tests::{secs, wait_for, wait_until, Cluster, ClusterOpts, Http};
use serde_json::json;

/// A raw watch connection, read line by line.
struct Lines {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Lines {
    async fn open(base: &str, query: &str) -> reqwest::Response {
        reqwest::get(format!("{base}/v1/watch?{query}")).await.expect("connect")
    }

    async fn start(base: &str, query: &str) -> Lines {
        let resp = Lines::open(base, query).await;
        assert_eq!(resp.status(), 200);
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        assert_eq!(ct, "application/x-ndjson");
        Lines { resp, buf: Vec::new() }
    }

    /// The next line, or `None` at the end of the stream (within `timeout`).
    async fn next(&mut self, timeout: Duration) -> Option<WatchEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                return Some(serde_json::from_slice(&line).expect("a JSON line"));
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk()).await.expect("a line in time");
            match chunk.expect("reading the stream") {
                Some(c) => self.buf.extend_from_slice(&c),
                None => return None,
            }
        }
    }

    /// The next `put` or `delete`, skipping progress lines.
    async fn next_change(&mut self, timeout: Duration) -> WatchEvent {
        loop {
            match self.next(timeout).await.expect("the stream goes on") {
                WatchEvent::Progress { .. } => continue,
                e => return e,
            }
        }
    }
}

fn key_version(e: &WatchEvent) -> Option<(String, u64)> {
    match e {
        WatchEvent::Put { key, version, .. } | WatchEvent::Delete { key, version, .. } => Some((key.clone(), *version)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_write_arrives_once_and_in_order_through_two_splits_and_a_node_kill() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    // Watching through node 3, which is killed below: the stream moves on
    // to another node by itself.
    let client = Client::new([c.api(3), c.api(1), c.api(2)]).expect("client");
    let Watching { seen, task: watcher } = Watching::start(&client, WatchRequest::prefix("w/")).await;

    // Writers: puts and deletes of 60 keys through every node; what was
    // acknowledged, and what was tried (an unanswered write may or may
    // not have happened).
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashSet<(String, u64)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let (stop, acked, apis, http) = (stop.clone(), acked.clone(), c.apis(), Http::with_timeout(secs(5)));
        writers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("w/{:02}", (i * 7) % 60);
                let api = &apis[i as usize % apis.len()];
                let r = if i % 5 == 4 {
                    http.delete(api, &key, None).await
                } else {
                    http.put(api, &key, &json!({"writer": w, "i": i}), None).await
                };
                if let Some(r) = r.ok().filter(|r| r.status == 200) {
                    acked.lock().unwrap().insert((key, r.write_result().version));
                }
                i += 3;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for key in ["w/20", "w/40"] {
        let id = start_split(&c, 1, json!({ "key": key })).await;
        wait_done(&c, id, secs(60)).await;
    }
    assert_eq!(c.metric(3, "cleave_watchers").await, 1.0, "the watch runs at node 3");
    c.kill(3);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "writes went through: {}", acked.len());
    wait_until(secs(60), "every acknowledged write is seen", || async {
        let seen: HashSet<(String, u64)> = seen.lock().unwrap().iter().filter_map(key_version).collect();
        acked.iter().all(|a| seen.contains(a))
    })
    .await;
    watcher.abort();

    let seen = seen.lock().unwrap().clone();
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (key, version) in seen.iter().filter_map(key_version) {
        per_key.entry(key).or_default().push(version);
    }
    for (key, versions) in &per_key {
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{key}: versions out of order or twice: {versions:?}");
    }
    // Cursors only move forward, and every progress cursor is a promise:
    // no change after it carries a cursor at or below it.
    let cursors: Vec<&str> = seen.iter().filter_map(WatchEvent::cursor).collect();
    assert!(cursors.windows(2).all(|w| order_key(w[0]) <= order_key(w[1])), "cursors go forward");
}

/// A cursor (`ts[.origin.key]`, hex) as a comparable `(timestamp, has
/// origin, origin, key)`; "all of a timestamp" sorts after its changes.
fn order_key(cursor: &str) -> (u64, u8, u128, Vec<u8>) {
    let mut parts = cursor.split('.');
    let ts = u64::from_str_radix(parts.next().unwrap(), 16).unwrap();
    match (parts.next(), parts.next()) {
        (Some(origin), Some(key)) => (ts, 0, u128::from_str_radix(origin, 16).unwrap(), key.as_bytes().to_vec()),
        _ => (ts, 1, 0, Vec::new()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumed_at_another_node_misses_nothing_and_repeats_nothing() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let mut first = Lines::start(&c.api(1), "start=r/&end=r0&prev=true").await;
    assert!(matches!(first.next(secs(20)).await, Some(WatchEvent::Progress { .. })), "the first line: established");
    for i in 0..10 {
        c.put_ok(1 + i % 3, &format!("r/{}", i % 4), &json!(i)).await;
    }
    let mut before = Vec::new();
    for _ in 0..5 {
        before.push(first.next_change(secs(10)).await);
    }
    let WatchEvent::Put { key, prev, .. } = &before[4] else { panic!("{:?}", before[4]) };
    assert_eq!(key, "r/0");
    assert_eq!(prev.as_ref().map(|p| (p.value.clone(), p.version)), Some((json!(0), 1)), "the value it replaced");
    let cursor = before[4].cursor().unwrap().to_string();
    drop(first);
    for i in 10..20 {
        c.put_ok(1 + i % 3, &format!("r/{}", i % 4), &json!(i)).await;
    }
    let mut resumed = Lines::start(&c.api(2), &format!("start=r/&end=r0&cursor={cursor}")).await;
    let Some(WatchEvent::Progress { cursor: at }) = resumed.next(secs(10)).await else { panic!("progress first") };
    assert_eq!(at, cursor, "resumed exactly there");
    let mut after = Vec::new();
    for _ in 0..15 {
        after.push(resumed.next_change(secs(10)).await);
    }
    let got: Vec<(String, u64)> = after.iter().filter_map(key_version).collect();
    let expected: Vec<(String, u64)> = (5..20).map(|i| (format!("r/{}", i % 4), i / 4 + 1)).collect();
    assert_eq!(got, expected, "writes 6 to 20, each once, in order");
    let WatchEvent::Put { value, prev, .. } = &after[14] else { panic!("{:?}", after[14]) };
    assert_eq!((value, prev), (&json!(19), &None), "the value written; no previous value unless asked");
    // Resumed there again, asking for previous values: every change says
    // which value it replaced, the first ones read at the opening too.
    let mut with_prev = Lines::start(&c.api(3), &format!("start=r/&end=r0&cursor={cursor}&prev=true")).await;
    assert!(matches!(with_prev.next(secs(10)).await, Some(WatchEvent::Progress { .. })));
    for _ in 0..15 {
        let WatchEvent::Put { key, version, prev, .. } = with_prev.next_change(secs(10)).await else { panic!() };
        assert_eq!(prev.map(|p| p.version), Some(version - 1), "{key} v{version}: the value it replaced");
    }
}

/// Transactions writing both sides of a split point, from every node at
/// once: each one's writes come out next to each other, never with
/// another's in between, and every one is seen once. (Two committed at the
/// very same timestamp through two nodes are rare here; their order is
/// `watch::plan`'s unit test's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_transactions_writes_come_out_together() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let id = start_split(&c, 1, json!({ "key": "t/m" })).await;
    wait_done(&c, id, secs(60)).await;
    let mut w = Lines::start(&c.api(1), "start=t/&end=t0").await;
    assert!(matches!(w.next(secs(20)).await, Some(WatchEvent::Progress { .. })), "established");
    const EACH: usize = 40;
    let mut coordinators = Vec::new();
    for node in 1..=3u64 {
        let (api, http) = (c.api(node), Http::new());
        coordinators.push(tokio::spawn(async move {
            for i in 0..EACH {
                let tag = format!("{node}-{i}");
                let body = json!({"success": [
                    {"op": "put", "key": format!("t/a/{tag}"), "value": tag},
                    {"op": "put", "key": format!("t/z/{tag}"), "value": tag}]});
                let r = wait_for(secs(30), format!("txn {tag}"), || async {
                    http.txn(&api, &body).await.ok().filter(|r| r.status != 503)
                })
                .await;
                assert_eq!(r.status, 200, "txn {tag}: {r:?}");
            }
        }));
    }
    for t in coordinators {
        t.await.unwrap();
    }
    let mut tags = Vec::new();
    for _ in 0..3 * EACH * 2 {
        let WatchEvent::Put { value, .. } = w.next_change(secs(10)).await else { panic!("only puts were made") };
        tags.push(value.as_str().expect("a tag").to_string());
    }
    for pair in tags.chunks(2) {
        assert_eq!(pair[0], pair[1], "a transaction's two writes side by side: {tags:?}");
    }
    let distinct: HashSet<&String> = tags.iter().collect();
    assert_eq!(distinct.len(), 3 * EACH, "each transaction once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_the_history_kept_is_refused_with_410() {
    let opts = ClusterOpts { extra_args: vec!["--watch-retention".into(), "1".into()], ..Default::default() };
    let c = Cluster::start(3, opts).await;
    let mut w = Lines::start(&c.api(1), "start=h/&end=h0").await;
    w.next(secs(20)).await.expect("established");
    c.put_ok(1, "h/a", &json!(1)).await;
    let first = w.next_change(secs(10)).await.cursor().unwrap().to_string();
    c.put_ok(1, "h/a", &json!(2)).await;
    drop(w);
    // Right after the first change the second is still there, until the
    // trim (every few seconds, past one second of retention) drops both.
    let http = Http::new();
    let resumed = wait_for(secs(60), "the history is trimmed", || async {
        let r = Lines::open(&c.api(2), &format!("start=h/&end=h0&cursor={first}")).await;
        (r.status() == 410).then_some(r)
    })
    .await;
    let body: serde_json::Value = resumed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "compacted", "{body}");
    // A cursor that is not one (or one far in the future), or a range that
    // is not, is a 400.
    for query in ["cursor=xyz", "start=b&end=a", "start=a&limit=3", "prev=maybe", "cursor=ffffffffffffffff"] {
        let r = http.get_path(&c.api(1), &format!("/v1/watch?{query}")).await.unwrap();
        r.expect_error(400, cleave_tests::ErrorCode::BadRequest);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_does_not_read_is_cut_off_and_a_reader_is_not() {
    let opts = ClusterOpts { extra_args: vec!["--watch-queue-mb".into(), "1".into()], ..Default::default() };
    let c = Cluster::start(3, opts).await;
    let mut idle = Lines::start(&c.api(1), "start=s/&end=s0").await;
    idle.next(secs(20)).await.expect("established");
    let mut reader = Lines::start(&c.api(1), "start=s/&end=s0").await;
    reader.next(secs(20)).await.expect("established");
    // 24 MiB of changes: past the queue, the sockets' buffers and all.
    let big = json!("x".repeat(500 << 10));
    let (mut read, mut written) = (0, 0);
    for i in 0..48 {
        c.put_ok(1 + i % 3, &format!("s/{i}"), &big).await;
        written += 1;
        while read < written {
            reader.next_change(secs(20)).await;
            read += 1;
        }
    }
    // The idle one's queue is full and nothing is taken from it: after a
    // while it is cut off. Read now, it has the changes queued before,
    // then the error line, then the end.
    wait_until(secs(30), "the idle watcher is cut off", || async {
        c.metric(1, "cleave_watch_slow_cutoffs_total").await >= 1.0
    })
    .await;
    let mut last = None;
    while let Some(e) = idle.next(secs(30)).await {
        last = Some(e);
    }
    match last {
        Some(WatchEvent::Error { code, .. }) => assert_eq!(code, "slow"),
        other => panic!("cut off with an error line, not {other:?}"),
    }
    assert_eq!(read, 48, "the reader kept up and was not cut off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_watchers_on_one_node_each_see_every_change() {
    raise_open_files(4096);
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let mut opened = Vec::new();
    for _ in 0..1000 {
        opened.push(tokio::spawn(Lines::start_owned(c.api(1), "start=t/&end=t0".to_string())));
    }
    let mut watchers = Vec::new();
    for o in opened {
        let mut w = o.await.unwrap();
        w.next(secs(60)).await.expect("established");
        watchers.push(w);
    }
    let watching = c.metric(1, "cleave_watchers").await;
    assert_eq!(watching, 1000.0, "the node counts them");
    for i in 0..5 {
        c.put_ok(2, &format!("t/{i}"), &json!(i)).await;
    }
    let seen: Vec<_> = futures::future::join_all(watchers.into_iter().map(|mut w| async move {
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(key_version(&w.next_change(secs(60)).await).unwrap());
        }
        got
    }))
    .await;
    let expected: Vec<(String, u64)> = (0..5).map(|i| (format!("t/{i}"), 1)).collect();
    let wrong = seen.iter().filter(|s| **s != expected).count();
    assert_eq!(wrong, 0, "every watcher sees the five changes in order");
}

impl Lines {
    async fn start_owned(base: String, query: String) -> Lines {
        Lines::start(&base, &query).await
    }
}

/// Raises this process's open-file limit (the nodes it starts inherit it).
fn raise_open_files(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the struct given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        assert!(lim.rlim_max >= want, "the hard limit on open files ({}) is below {want}", lim.rlim_max);
        lim.rlim_cur = lim.rlim_cur.max(want);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}
