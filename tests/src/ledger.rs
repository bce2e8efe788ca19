//! The ledger of a load test: what the cluster acknowledged and what it was
//! seen to hold, and the writer, reader and scanner tasks that fill it.
//!
//! Every key has a single writer task, so its acknowledged versions must
//! strictly increase; a version must never carry two different values; a
//! linearizable read must see at least the last acknowledged version; after
//! the load, every key must read back its last acknowledged write (or a later
//! write whose outcome was unknown). Tests of splits, moves and node loss
//! share it so they check the same invariants the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::{secs, value_of, Cluster, Http, Item, NodeId, Resp};

// ---------------------------------------------------------------------------
// Time and small utilities
// ---------------------------------------------------------------------------

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A tiny deterministic PRNG (xorshift64*), enough to spread load.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

/// Whether an error from [`Http`] proves the request never reached the node
/// (so it cannot have been applied).
pub fn not_sent(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<reqwest::Error>().is_some_and(|e| e.is_connect()))
}

// ---------------------------------------------------------------------------
// The ledger: what the cluster acknowledged, and what it was seen to hold
// ---------------------------------------------------------------------------

/// The value the test writes for `key` in write number `seq`.
pub fn value_for(key: &str, seq: u64) -> Value {
    json!({"key": key, "seq": seq})
}

/// The write number a value read back carries; panics on a value the test
/// never wrote.
pub fn seq_of(key: &str, item: &Item) -> u64 {
    let v = value_of(item);
    assert_eq!(v["key"], json!(key), "value of {key:?} names another key: {v}");
    v["seq"].as_u64().unwrap_or_else(|| panic!("value of {key:?} was not written by this test: {v}"))
}

/// What happened to one key. Every key has a single writer task, so its
/// acknowledged versions must strictly increase.
#[derive(Default, Debug)]
pub struct KeyHist {
    /// The last acknowledged write: (version, seq).
    pub acked: Option<(u64, u64)>,
    /// Writes whose outcome is unknown (timeout, 503, connection lost).
    pub maybe: BTreeSet<u64>,
    /// Every (version → seq) seen in an ack or a read: a version must never
    /// carry two different values.
    pub seen: BTreeMap<u64, u64>,
}

#[derive(Default)]
pub struct LedgerState {
    pub keys: BTreeMap<String, KeyHist>,
    pub violations: Vec<String>,
    /// (unix ms, key, latency ms) of every acknowledged write.
    pub acks: Vec<(u64, String, u64)>,
    /// Answers that were neither success nor a definite error: status → count.
    pub indeterminate: BTreeMap<String, u64>,
    pub reads: u64,
    /// (start, end) unix ms of every complete, correct full scan.
    pub scans: Vec<(u64, u64)>,
}

/// Shared by writer and reader tasks and the final checks.
#[derive(Default)]
pub struct Ledger {
    pub state: Mutex<LedgerState>,
    pub next_seq: AtomicU64,
}

impl Ledger {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The version every linearizable read of `key` must reach right now.
    pub fn floor(&self, key: &str) -> u64 {
        self.lock().keys.get(key).and_then(|h| h.acked).map_or(0, |(v, _)| v)
    }

    pub fn violation(&self, what: String) {
        eprintln!("VIOLATION: {what}");
        self.lock().violations.push(what);
    }

    /// Records that `key` held write `seq` at `version` (ack or read).
    pub fn observe(st: &mut LedgerState, key: &str, version: u64, seq: u64, how: &str) {
        let h = st.keys.entry(key.to_owned()).or_default();
        match h.seen.get(&version) {
            Some(&other) if other != seq => {
                let msg =
                    format!("{key:?} version {version} holds write #{seq} ({how}) but held write #{other} before");
                st.violations.push(msg);
            }
            _ => {
                h.seen.insert(version, seq);
            }
        }
    }

    pub fn ack(&self, key: &str, seq: u64, version: u64, latency: Duration) {
        let mut st = self.lock();
        let h = st.keys.entry(key.to_owned()).or_default();
        if let Some((v, s)) = h.acked {
            if version <= v {
                let msg = format!(
                    "{key:?}: write #{seq} acknowledged at version {version}, not above the earlier ack of #{s} at {v}"
                );
                st.violations.push(msg);
            }
        }
        let h = st.keys.get_mut(key).expect("key");
        if h.acked.is_none_or(|(v, _)| version > v) {
            h.acked = Some((version, seq));
        }
        Self::observe(&mut st, key, version, seq, "ack");
        st.acks.push((unix_ms(), key.to_owned(), latency.as_millis() as u64));
    }

    pub fn maybe(&self, key: &str, seq: u64, why: String) {
        let mut st = self.lock();
        st.keys.entry(key.to_owned()).or_default().maybe.insert(seq);
        *st.indeterminate.entry(why).or_default() += 1;
    }

    /// Why `resp` (a read of `key` after the writers stopped) does not show
    /// the last acknowledged write or a later write of unknown outcome.
    pub fn mismatch(&self, key: &str, resp: &Resp) -> Option<String> {
        let mut st = self.lock();
        let h = st.keys.get(key).unwrap_or_else(|| panic!("{key:?} is not in the ledger"));
        let (acked, maybe) = (h.acked, h.maybe.clone());
        match resp.status {
            200 => {
                let item = resp.item();
                if item.key != key {
                    return Some(format!("read of {key:?} answered key {:?}", item.key));
                }
                let seq = seq_of(key, &item);
                Self::observe(&mut st, key, item.version, seq, "final read");
                match acked {
                    Some((v, s)) if item.version == v && seq == s => None,
                    Some((v, _)) if item.version > v && maybe.contains(&seq) => None,
                    None if maybe.contains(&seq) => None,
                    _ => Some(format!(
                        "{key:?}: read version {} (write #{seq}), last ack {acked:?} (version, write #); \
                         writes of unknown outcome {maybe:?}",
                        item.version
                    )),
                }
            }
            404 if acked.is_none() => None,
            _ => Some(format!("{key:?}: last ack {acked:?} (version, write #) but the read answered {resp:?}")),
        }
    }

    pub fn key_list(&self) -> Vec<String> {
        self.lock().keys.keys().cloned().collect()
    }

    pub fn assert_no_violations(&self) {
        let st = self.lock();
        assert!(
            st.violations.is_empty(),
            "{} violations, first ones:\n{}",
            st.violations.len(),
            st.violations.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
        );
    }

    /// Acknowledged writes of keys matching `pred` whose ack arrived in
    /// `[from_ms, to_ms]`.
    pub fn acks_between(&self, from_ms: u64, to_ms: u64, pred: impl Fn(&str) -> bool) -> usize {
        self.lock().acks.iter().filter(|(t, k, _)| (from_ms..=to_ms).contains(t) && pred(k)).count()
    }

    pub fn ack_count(&self) -> usize {
        self.lock().acks.len()
    }

    pub fn summary(&self) -> String {
        let st = self.lock();
        let max = st.acks.iter().map(|a| a.2).max().unwrap_or(0);
        format!(
            "{} acked writes (max latency {max} ms), {} reads, indeterminate {:?}",
            st.acks.len(),
            st.reads,
            st.indeterminate
        )
    }
}

/// Writes `keys` once each (version 1) through `nodes`, 8 at a time, and
/// records them in the ledger.
pub async fn preload(c: &Cluster, ledger: &Arc<Ledger>, keys: &[String], pad: usize) {
    let apis: Vec<String> = c.up_ids().iter().map(|&id| c.api(id)).collect();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let keys = Arc::new(keys.to_vec());
    let mut set = JoinSet::new();
    for _ in 0..8 {
        let (http, apis, next, keys, ledger) =
            (c.http.clone(), apis.clone(), next.clone(), keys.clone(), ledger.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(key) = keys.get(i) else { return };
                let seq = ledger.next_seq();
                let mut value = value_for(key, seq);
                if pad > 0 {
                    value["pad"] = json!("p".repeat(pad));
                }
                let t = Instant::now();
                let r = http.put(&apis[i % apis.len()], key, &value, None).await.expect("preload PUT");
                assert_eq!(r.write_result().version, 1, "first write of {key}: {r:?}");
                ledger.ack(key, seq, 1, t.elapsed());
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("preload task panicked");
    }
}

/// Reads every key of the ledger through node `via` (linearizable) and
/// asserts each shows its last acknowledged write (or a later write of
/// unknown outcome).
pub async fn verify_ledger(c: &Cluster, ledger: &Ledger, via: NodeId) {
    let mut bad = Vec::new();
    let keys = ledger.key_list();
    for key in &keys {
        let r = c.read_retry(via, key, Some("linearizable"), secs(20)).await;
        if let Some(why) = ledger.mismatch(key, &r) {
            bad.push(why);
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} keys read through node {via} lost acknowledged writes; first ones:\n{}",
        bad.len(),
        keys.len(),
        bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    ledger.assert_no_violations();
}

/// A full scan (small pages) returns every ledger key exactly once, in
/// order, each with its acknowledged write; returns the items.
pub async fn verify_scan(c: &Cluster, ledger: &Ledger, via: NodeId, page: usize) -> Vec<Item> {
    let items = c.http.scan_all(&c.api(via), None, None, page).await;
    for pair in items.windows(2) {
        assert!(pair[0].key < pair[1].key, "scan through node {via}: {:?} then {:?}", pair[0].key, pair[1].key);
    }
    let got: Vec<&str> = items.iter().map(|i| i.key.as_str()).filter(|k| !k.starts_with("__")).collect();
    let want = ledger.key_list();
    if got != want.iter().map(String::as_str).collect::<Vec<_>>() {
        let got_set: BTreeSet<&str> = got.iter().copied().collect();
        let missing: Vec<&String> = want.iter().filter(|k| !got_set.contains(k.as_str())).take(10).collect();
        panic!(
            "scan through node {via} returned {} keys, expected {}; missing (first 10): {missing:?}; first returned: {:?}",
            got.len(),
            want.len(),
            &got[..got.len().min(10)]
        );
    }
    for item in items.iter().filter(|i| !i.key.starts_with("__")) {
        let resp = Resp {
            status: 200,
            retry_after: None,
            content_type: None,
            body: serde_json::to_string(item).expect("encode item"),
        };
        if let Some(why) = ledger.mismatch(&item.key, &resp) {
            panic!("scan through node {via}: {why}");
        }
    }
    items
}

// ---------------------------------------------------------------------------
// Load: writer and reader tasks
// ---------------------------------------------------------------------------

/// Writer and reader tasks running against the cluster until stopped.
pub struct Load {
    pub stop: Arc<AtomicBool>,
    pub tasks: JoinSet<()>,
}

impl Load {
    /// `writers` tasks, each the only writer of every `writers`-th key, and
    /// `readers` tasks doing linearizable reads of random keys. Requests go
    /// through `nodes` in turn.
    pub fn start(
        c: &Cluster,
        ledger: &Arc<Ledger>,
        keys: &[String],
        nodes: &[NodeId],
        writers: usize,
        readers: usize,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let apis: Arc<Vec<String>> = Arc::new(nodes.iter().map(|&id| c.api(id)).collect());
        let mut tasks = JoinSet::new();
        for w in 0..writers {
            let mine: Vec<String> = keys.iter().skip(w).step_by(writers).cloned().collect();
            let (ledger, apis, stop, http) = (ledger.clone(), apis.clone(), stop.clone(), Http::new());
            tasks.spawn(async move {
                let mut rng = Rng::new(w as u64 + 1);
                let mut n = w;
                while !stop.load(Ordering::SeqCst) {
                    let key = &mine[rng.below(mine.len())];
                    n += 1;
                    let api = &apis[n % apis.len()];
                    let seq = ledger.next_seq();
                    let t = Instant::now();
                    match http.put(api, key, &value_for(key, seq), None).await {
                        Ok(r) if r.status == 200 => {
                            let wr = r.write_result();
                            assert_eq!(wr.key, *key, "write answer names another key: {r:?}");
                            ledger.ack(key, seq, wr.version, t.elapsed());
                        }
                        Ok(r) if matches!(r.status, 503 | 504) => {
                            r.error();
                            ledger.maybe(key, seq, format!("{} {:?}", r.status, r.error().error.code));
                        }
                        Ok(r) => {
                            ledger.maybe(key, seq, format!("unexpected {}", r.status));
                            ledger.violation(format!("PUT {key} through {api}: unexpected answer {r:?}"));
                        }
                        Err(e) if not_sent(&e) => {}
                        Err(e) => ledger.maybe(key, seq, format!("transport: {}", e.root_cause())),
                    }
                }
            });
        }
        for r in 0..readers {
            let (ledger, apis, stop, http, keys) =
                (ledger.clone(), apis.clone(), stop.clone(), Http::new(), keys.to_vec());
            tasks.spawn(async move {
                let mut rng = Rng::new(1000 + r as u64);
                let mut last: BTreeMap<String, u64> = BTreeMap::new();
                let mut n = r;
                while !stop.load(Ordering::SeqCst) {
                    let key = &keys[rng.below(keys.len())];
                    n += 1;
                    let api = &apis[n % apis.len()];
                    let floor = ledger.floor(key);
                    let Ok(resp) = http.get(api, key, Some("linearizable")).await else { continue };
                    match resp.status {
                        200 => {
                            let item = resp.item();
                            let seq = seq_of(key, &item);
                            let mut st = ledger.lock();
                            st.reads += 1;
                            Ledger::observe(&mut st, key, item.version, seq, "read");
                            drop(st);
                            if item.version < floor {
                                ledger.violation(format!(
                                    "linearizable read of {key:?} through {api} returned version {} after version {floor} was acknowledged",
                                    item.version
                                ));
                            }
                            let prev = last.insert(key.clone(), item.version).unwrap_or(0);
                            if item.version < prev {
                                ledger.violation(format!(
                                    "reader {r}: {key:?} went back from version {prev} to {} (through {api})",
                                    item.version
                                ));
                            }
                        }
                        503 | 504 => {}
                        _ => ledger.violation(format!("GET {key} through {api}: unexpected answer {resp:?}")),
                    }
                }
            });
        }
        Load { stop, tasks }
    }

    /// Adds `n` tasks that scan the whole key space over and over (pages of
    /// `page` items through `nodes` in turn). Each scan must return every one
    /// of `keys` (and nothing else) exactly once, in order, each at a version
    /// at least the one acknowledged before its page was asked for.
    pub fn add_scanners(&mut self, c: &Cluster, ledger: &Arc<Ledger>, keys: &[String], nodes: &[NodeId], n: usize) {
        let apis: Arc<Vec<String>> = Arc::new(nodes.iter().map(|&id| c.api(id)).collect());
        let mut keys = keys.to_vec();
        keys.sort();
        for t in 0..n {
            let (ledger, apis, stop, http, keys) =
                (ledger.clone(), apis.clone(), self.stop.clone(), Http::new(), keys.clone());
            self.tasks.spawn(async move {
                let mut n = t;
                'scans: while !stop.load(Ordering::SeqCst) {
                    let started = unix_ms();
                    let mut got: Vec<String> = Vec::new();
                    let mut cursor: Option<String> = None;
                    loop {
                        if stop.load(Ordering::SeqCst) {
                            break 'scans;
                        }
                        n += 1;
                        let api = &apis[n % apis.len()];
                        let floors: BTreeMap<String, u64> = ledger
                            .lock()
                            .keys
                            .iter()
                            .filter_map(|(k, h)| Some((k.clone(), h.acked?.0)))
                            .collect();
                        let Ok(r) = http.scan(api, cursor.as_deref(), None, Some("50")).await else { continue };
                        if matches!(r.status, 503 | 504) {
                            continue;
                        }
                        if r.status != 200 {
                            ledger.violation(format!("scan page from {cursor:?} through {api}: {r:?}"));
                            continue 'scans;
                        }
                        let page: crate::ScanResult = r.json();
                        for item in &page.items {
                            if got.last().is_some_and(|last| *last >= item.key) {
                                ledger.violation(format!(
                                    "scan through {api}: {:?} after {:?} (page from {cursor:?})",
                                    item.key,
                                    got.last()
                                ));
                            }
                            let seq = seq_of(&item.key, item);
                            Ledger::observe(&mut ledger.lock(), &item.key, item.version, seq, "scan");
                            let floor = floors.get(&item.key).copied().unwrap_or(0);
                            if item.version < floor {
                                ledger.violation(format!(
                                    "scan through {api} returned {:?} at version {} after version {floor} was acknowledged",
                                    item.key, item.version
                                ));
                            }
                            got.push(item.key.clone());
                        }
                        match page.next {
                            Some(next) => cursor = Some(next),
                            None => break,
                        }
                    }
                    if got != keys {
                        let have: BTreeSet<&String> = got.iter().collect();
                        let missing: Vec<&String> = keys.iter().filter(|k| !have.contains(k)).take(10).collect();
                        ledger.violation(format!(
                            "a full scan returned {} keys, expected {}; missing (first 10): {missing:?}",
                            got.len(),
                            keys.len()
                        ));
                    } else {
                        ledger.lock().scans.push((started, unix_ms()));
                    }
                }
            });
        }
    }

    /// Stops every task and waits for them; a panic in a task fails the test.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        while let Some(r) = self.tasks.join_next().await {
            r.expect("load task panicked");
        }
    }
}
