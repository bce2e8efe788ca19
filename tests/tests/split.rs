//! Live splits: a range moves into a new Raft group while clients read and
//! write it, under node kills, cancellation, repeated and automatic splits,
//! with routers holding a stale directory, and with bad admin input.
//!
//! Invariants checked (see `split-protocol.md`): no acknowledged write is
//! lost, a key's version never goes backwards, two different values never
//! share a version, the ranges always tile the key space, an aborted split
//! leaves no trace, and a committed split always finishes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cleave_metadata::range::check_tiling;
use cleave_tests::{
    secs, value_of, wait_for, wait_until, Cluster, ClusterOpts, ErrorCode, Expected, Http, Item, Liveness, Model,
    NodeId, OpKind, OperationView, Phase, RangeDescriptor, RangeState, Resp, ShardId, ShardStatus, FIRST_SHARD,
};
use serde_json::{json, Value};
use tokio::task::JoinSet;

// ---------------------------------------------------------------------------
// Time and small utilities
// ---------------------------------------------------------------------------

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A tiny deterministic PRNG (xorshift64*), enough to spread load.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

/// Whether an error from [`Http`] proves the request never reached the node
/// (so it cannot have been applied).
fn not_sent(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<reqwest::Error>().is_some_and(|e| e.is_connect()))
}

// ---------------------------------------------------------------------------
// The ledger: what the cluster acknowledged, and what it was seen to hold
// ---------------------------------------------------------------------------

/// The value the test writes for `key` in write number `seq`.
fn value_for(key: &str, seq: u64) -> Value {
    json!({"key": key, "seq": seq})
}

/// The write number a value read back carries; panics on a value the test
/// never wrote.
fn seq_of(key: &str, item: &Item) -> u64 {
    let v = value_of(item);
    assert_eq!(v["key"], json!(key), "value of {key:?} names another key: {v}");
    v["seq"].as_u64().unwrap_or_else(|| panic!("value of {key:?} was not written by this test: {v}"))
}

/// What happened to one key. Every key has a single writer task, so its
/// acknowledged versions must strictly increase.
#[derive(Default, Debug)]
struct KeyHist {
    /// The last acknowledged write: (version, seq).
    acked: Option<(u64, u64)>,
    /// Writes whose outcome is unknown (timeout, 503, connection lost).
    maybe: BTreeSet<u64>,
    /// Every (version → seq) seen in an ack or a read: a version must never
    /// carry two different values.
    seen: BTreeMap<u64, u64>,
}

#[derive(Default)]
struct LedgerState {
    keys: BTreeMap<String, KeyHist>,
    violations: Vec<String>,
    /// (unix ms, key, latency ms) of every acknowledged write.
    acks: Vec<(u64, String, u64)>,
    /// Answers that were neither success nor a definite error: status → count.
    indeterminate: BTreeMap<String, u64>,
    reads: u64,
    /// (start, end) unix ms of every complete, correct full scan.
    scans: Vec<(u64, u64)>,
}

/// Shared by writer and reader tasks and the final checks.
#[derive(Default)]
struct Ledger {
    state: Mutex<LedgerState>,
    next_seq: AtomicU64,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The version every linearizable read of `key` must reach right now.
    fn floor(&self, key: &str) -> u64 {
        self.lock().keys.get(key).and_then(|h| h.acked).map_or(0, |(v, _)| v)
    }

    fn violation(&self, what: String) {
        eprintln!("VIOLATION: {what}");
        self.lock().violations.push(what);
    }

    /// Records that `key` held write `seq` at `version` (ack or read).
    fn observe(st: &mut LedgerState, key: &str, version: u64, seq: u64, how: &str) {
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

    fn ack(&self, key: &str, seq: u64, version: u64, latency: Duration) {
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

    fn maybe(&self, key: &str, seq: u64, why: String) {
        let mut st = self.lock();
        st.keys.entry(key.to_owned()).or_default().maybe.insert(seq);
        *st.indeterminate.entry(why).or_default() += 1;
    }

    /// Why `resp` (a read of `key` after the writers stopped) does not show
    /// the last acknowledged write or a later write of unknown outcome.
    fn mismatch(&self, key: &str, resp: &Resp) -> Option<String> {
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

    fn key_list(&self) -> Vec<String> {
        self.lock().keys.keys().cloned().collect()
    }

    fn assert_no_violations(&self) {
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
    fn acks_between(&self, from_ms: u64, to_ms: u64, pred: impl Fn(&str) -> bool) -> usize {
        self.lock().acks.iter().filter(|(t, k, _)| (from_ms..=to_ms).contains(t) && pred(k)).count()
    }

    fn ack_count(&self) -> usize {
        self.lock().acks.len()
    }

    fn summary(&self) -> String {
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
async fn preload(c: &Cluster, ledger: &Arc<Ledger>, keys: &[String], pad: usize) {
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
async fn verify_ledger(c: &Cluster, ledger: &Ledger, via: NodeId) {
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
async fn verify_scan(c: &Cluster, ledger: &Ledger, via: NodeId, page: usize) -> Vec<Item> {
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
struct Load {
    stop: Arc<AtomicBool>,
    tasks: JoinSet<()>,
}

impl Load {
    /// `writers` tasks, each the only writer of every `writers`-th key, and
    /// `readers` tasks doing linearizable reads of random keys. Requests go
    /// through `nodes` in turn.
    fn start(
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
    fn add_scanners(&mut self, c: &Cluster, ledger: &Arc<Ledger>, keys: &[String], nodes: &[NodeId], n: usize) {
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
                        let page: cleave_tests::ScanResult = r.json();
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
    async fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        while let Some(r) = self.tasks.join_next().await {
            r.expect("load task panicked");
        }
    }
}

// ---------------------------------------------------------------------------
// Split admin helpers
// ---------------------------------------------------------------------------

/// Starts a split through node `via` (retrying transient answers); returns
/// the operation id.
async fn start_split(c: &Cluster, via: NodeId, body: Value) -> u64 {
    let api = c.api(via);
    let r = wait_for(secs(20), format_args!("POST /admin/split {body} through node {via} to answer"), || async {
        let r = c.http.admin_split(&api, body.to_string()).await.ok()?;
        (!r.is_transient()).then_some(r)
    })
    .await;
    assert_eq!(r.status, 200, "POST /admin/split {body}: {r:?}");
    r.value()["operation_id"].as_u64().unwrap_or_else(|| panic!("no operation_id in {r:?}"))
}

/// The operation as some running node reports it.
async fn try_op(c: &Cluster, id: u64) -> Option<OperationView> {
    for node in c.up_ids() {
        if let Ok(v) = c.http.admin_operation(&c.api(node), id).await {
            return Some(v);
        }
    }
    None
}

fn split_kind(v: &OperationView) -> (u64, &str, ShardId, ShardId, u64) {
    let OpKind::Split { range_id, split_key, source, target, new_range_id, .. } = &v.op.kind;
    (*range_id, split_key.as_str(), *source, *target, *new_range_id)
}

fn describe(v: &OperationView) -> String {
    let (range, key, source, target, new_range) = split_kind(v);
    format!(
        "op {} (split range {range} at {key:?}, shard {source} → {target} as range {new_range}): phase {:?}, \
         durations {:?}, pause {:?} ms, progress {:?}, error {:?}, cleaned {}",
        v.op.op_id, v.op.phase, v.phase_durations_ms, v.op.write_pause_ms, v.op.progress, v.op.error, v.op.cleaned
    )
}

/// Waits until operation `id` is in `phase`; panics if it ends in another.
async fn wait_phase(c: &Cluster, id: u64, phase: Phase, timeout: Duration) -> OperationView {
    let mut last = None;
    let start = Instant::now();
    loop {
        if let Some(v) = try_op(c, id).await {
            if v.op.phase == phase {
                return v;
            }
            assert!(
                !v.op.phase.is_terminal() && v.op.phase < phase,
                "operation {id} went past {phase:?} before the test saw it: {}",
                describe(&v)
            );
            last = Some(v);
        }
        assert!(
            start.elapsed() < timeout,
            "operation {id} did not reach {phase:?} within {timeout:?}; last seen: {:?}",
            last.as_ref().map(describe)
        );
        c.assert_running();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until operation `id` is done, or aborted and cleaned up.
async fn wait_ended(c: &Cluster, id: u64, timeout: Duration) -> OperationView {
    let mut last: Option<OperationView> = None;
    let start = Instant::now();
    loop {
        if let Some(v) = try_op(c, id).await {
            if v.op.phase == Phase::Done || (v.op.phase == Phase::Aborted && v.op.cleaned) {
                return v;
            }
            last = Some(v);
        }
        if start.elapsed() > timeout {
            panic!(
                "operation {id} did not end (done, or aborted and cleaned) within {timeout:?}; last seen: {}",
                last.as_ref().map_or("nothing".into(), describe)
            );
        }
        c.assert_running();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until operation `id` is done; panics if it aborts.
async fn wait_done(c: &Cluster, id: u64, timeout: Duration) -> OperationView {
    let v = wait_ended(c, id, timeout).await;
    assert_eq!(v.op.phase, Phase::Done, "split aborted: {}", describe(&v));
    v
}

/// `/admin/ranges` from some running node, sorted by start, checked to tile
/// the key space.
async fn ranges(c: &Cluster) -> Vec<RangeDescriptor> {
    let mut rs = wait_for(secs(15), "/admin/ranges to answer", || async {
        for node in c.up_ids() {
            if let Ok(rs) = c.http.admin_ranges(&c.api(node)).await {
                return Some(rs);
            }
        }
        None
    })
    .await;
    rs.sort_by(|a, b| a.start.cmp(&b.start));
    if let Err(e) = check_tiling(&rs) {
        panic!("ranges do not tile the key space: {e}\n{rs:#?}");
    }
    rs
}

fn range_of<'a>(rs: &'a [RangeDescriptor], key: &str) -> &'a RangeDescriptor {
    rs.iter().find(|r| r.contains(key)).unwrap_or_else(|| panic!("no range holds {key:?}: {rs:?}"))
}

/// Asserts the directory shows the outcome of split `v` of `before` (the
/// range as it was just before the split).
async fn assert_split_outcome(c: &Cluster, v: &OperationView, before: &RangeDescriptor) {
    let (range_id, key, source, target, new_range_id) = split_kind(v);
    assert_eq!((range_id, source), (before.range_id, before.shard_id), "split of another range: {}", describe(v));
    let rs = ranges(c).await;
    let shards = shards(c).await;
    match v.op.phase {
        Phase::Done => {
            let left = rs.iter().find(|r| r.range_id == range_id).expect("left range");
            let right = rs.iter().find(|r| r.range_id == new_range_id).expect("right range");
            let want_left = RangeDescriptor {
                end: Some(key.to_owned()),
                epoch: before.epoch + 1,
                state: RangeState::Active,
                ..before.clone()
            };
            let want_right = RangeDescriptor {
                range_id: new_range_id,
                start: key.to_owned(),
                end: before.end.clone(),
                shard_id: target,
                epoch: before.epoch + 1,
                state: RangeState::Active,
            };
            assert_eq!((left, right), (&want_left, &want_right), "ranges after {}", describe(v));
            assert_ne!(target, source);
            let OpKind::Split { target_replicas, .. } = &v.op.kind;
            let s = shards.iter().find(|s| s.shard_id == target).expect("new shard listed in /admin/shards");
            let mut got = s.replicas.clone();
            got.sort();
            let mut want = target_replicas.clone();
            want.sort();
            assert_eq!(got, want, "replicas of the new shard {target}");
            // Freeze to commit is bounded by the 5 s freeze deadline (the
            // driver checks it just before it commits). The write pause runs
            // on to the activation, past any hold of `committed`.
            let pause = v.op.write_pause_ms.unwrap_or_else(|| panic!("no write_pause_ms reported: {}", describe(v)));
            let frozen = v.phase_durations_ms.iter().find(|(p, _)| *p == Phase::Frozen).map_or(0, |(_, ms)| *ms);
            assert!(frozen <= 5_500, "committed after {frozen} ms frozen, past the freeze deadline: {}", describe(v));
            assert!(pause >= frozen, "write pause {pause} ms shorter than the freeze: {}", describe(v));
        }
        Phase::Aborted => {
            assert!(v.op.cleaned, "{}", describe(v));
            let now = rs.iter().find(|r| r.range_id == range_id).expect("range still there");
            assert_eq!(now, before, "an aborted split changed its range: {}", describe(v));
            assert!(rs.iter().all(|r| r.range_id != new_range_id), "aborted split left range {new_range_id}: {rs:?}");
            assert!(
                shards.iter().all(|s| s.shard_id != target),
                "aborted split left shard {target} in /admin/shards: {shards:?}"
            );
        }
        p => panic!("operation not ended: {p:?}"),
    }
}

/// `/admin/shards` from some running node.
async fn shards(c: &Cluster) -> Vec<ShardStatus> {
    wait_for(secs(15), "/admin/shards to answer", || async {
        for node in c.up_ids() {
            if let Ok(s) = c.http.admin_shards(&c.api(node)).await {
                return Some(s);
            }
        }
        None
    })
    .await
}

/// Per node, the number of Raft groups it hosts (`cleave_groups`).
async fn groups_per_node(c: &Cluster) -> BTreeMap<NodeId, u64> {
    let mut out = BTreeMap::new();
    for id in c.up_ids() {
        out.insert(id, c.metric(id, "cleave_groups").await as u64);
    }
    out
}

/// Sum of a counter over every running node.
async fn metric_sum(c: &Cluster, name: &str) -> f64 {
    let mut sum = 0.0;
    for id in c.up_ids() {
        sum += c.metric(id, name).await;
    }
    sum
}

/// Waits until every shard in the directory has a running leader.
async fn wait_all_shards_led(c: &Cluster, timeout: Duration) {
    for s in shards(c).await.iter().map(|s| s.shard_id) {
        c.wait_for_group_leader(s, None, timeout).await;
    }
}

// ---------------------------------------------------------------------------
// 1. A split under load
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_under_load_keeps_every_acknowledged_write() {
    // Capturing is held for 2 s, so writes to the moving half are forwarded
    // to the new shard for a while before the cutover.
    let opts = ClusterOpts { extra_args: vec!["--fault-hold".into(), "capturing=2000".into()], ..Default::default() };
    let c = Cluster::start(3, opts).await;
    let ledger = Arc::new(Ledger::default());
    let keys: Vec<String> = (0..500).map(|i| format!("key/{i:04}")).collect();
    let split_key = "key/0250";
    preload(&c, &ledger, &keys, 0).await;
    let before = ranges(&c).await;
    assert_eq!(before.len(), 1, "{before:?}");
    let groups_before = groups_per_node(&c).await;

    let mut load = Load::start(&c, &ledger, &keys, &c.ids(), 4, 2);
    load.add_scanners(&c, &ledger, &keys, &c.ids(), 1);
    wait_until(secs(20), "100 acknowledged writes before the split", || async { ledger.ack_count() >= 600 }).await;
    let acks_before = ledger.ack_count();
    let t = Instant::now();
    let id = start_split(&c, 2, json!({"key": split_key})).await;
    let v = wait_done(&c, id, secs(60)).await;
    let split_took = t.elapsed();
    // Keep the load on a little after the cutover: writes to both halves
    // must go on being acknowledged, by the new shard too, and full scans
    // must go on completing.
    let at_done = ledger.ack_count();
    let done_at = v.op.entered(Phase::Done).expect("done");
    wait_until(secs(20), "100 more acknowledged writes and a full scan after the split", || async {
        ledger.ack_count() >= at_done + 100 && ledger.lock().scans.iter().any(|(s, _)| *s > done_at)
    })
    .await;
    load.stop().await;
    println!("split took {split_took:?}: {}", describe(&v));
    println!("load: {}", ledger.summary());
    ledger.assert_no_violations();

    // The split ran while the load did: writes to the moving half were
    // acknowledged while the source captured them, and after the cutover.
    let entered = |p| v.op.entered(p).unwrap_or_else(|| panic!("no {p:?} in history: {}", describe(&v)));
    let right = |k: &str| k >= split_key;
    let during = ledger.acks_between(entered(Phase::Capturing), entered(Phase::Frozen), right);
    let after = ledger.acks_between(entered(Phase::Done), u64::MAX, right);
    let left_during = ledger.acks_between(entered(Phase::Capturing), entered(Phase::Done), |k| !right(k));
    println!("acks to the moving half: {during} while capturing, {after} after done; to the other: {left_during}");
    assert!(during > 0, "no write to the moving half was acknowledged while it was captured");
    assert!(after > 0, "no write to the moved half was acknowledged after the split");
    assert!(left_during > 0, "no write to the staying half was acknowledged during the split");
    assert!(ledger.ack_count() > acks_before);
    // Full scans ran during the split, and after it (across both shards).
    let scans = ledger.lock().scans.clone();
    let scans_during =
        scans.iter().filter(|(s, e)| *e >= entered(Phase::Capturing) && *s <= entered(Phase::Done)).count();
    let scans_after = scans.iter().filter(|(s, _)| *s > entered(Phase::Done)).count();
    println!("{} full scans, {scans_during} during the split, {scans_after} after it", scans.len());
    assert!(scans_during > 0 && scans_after > 0, "no full scan completed during/after the split: {scans:?}");

    // The directory: two ranges tiling the key space, the right one owned by
    // a new shard, both at the next epoch; the pause was measured.
    assert_split_outcome(&c, &v, &before[0]).await;
    let rs = ranges(&c).await;
    assert_eq!(rs.len(), 2, "{rs:?}");
    assert_eq!((rs[0].start.as_str(), rs[0].end.as_deref()), ("", Some(split_key)));
    assert_eq!((rs[1].start.as_str(), rs[1].end.as_deref()), (split_key, None));
    assert_eq!(rs[0].shard_id, FIRST_SHARD);
    assert_ne!(rs[1].shard_id, FIRST_SHARD);
    println!("write pause reported: {:?} ms", v.op.write_pause_ms);
    assert!(v.op.write_pause_ms.is_some_and(|p| p < 5_000), "write pause beyond the deadline: {}", describe(&v));
    let p = &v.op.progress;
    assert_eq!((p.keys_copied, p.keys_total), (250, 250), "backfill progress: {}", describe(&v));
    assert!(p.bytes_copied > 0 && p.bytes_copied == p.bytes_total, "backfill progress: {}", describe(&v));
    // The new group exists on its replicas' nodes.
    let groups_after = groups_per_node(&c).await;
    let OpKind::Split { target_replicas, .. } = &v.op.kind;
    for r in target_replicas {
        assert_eq!(groups_after[&r.node_id], groups_before[&r.node_id] + 1, "groups on node {}", r.node_id);
    }
    // Exactly one split started and committed, none aborted.
    assert_eq!(metric_sum(&c, "cleave_splits_started_total").await, 1.0);
    assert_eq!(metric_sum(&c, "cleave_splits_committed_total").await, 1.0);
    assert_eq!(metric_sum(&c, "cleave_splits_aborted_total").await, 0.0);

    // Every acknowledged write is there, through every node; a full scan
    // sees each key exactly once, in order.
    for id in c.ids() {
        verify_ledger(&c, &ledger, id).await;
    }
    let items = verify_scan(&c, &ledger, 1, 37).await;
    assert_eq!(items.len(), keys.len());
    verify_scan(&c, &ledger, 3, 500).await;
}

// ---------------------------------------------------------------------------
// 2. Kills at every phase
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
/// Whose leader is killed.
enum Victim {
    /// The shard being split.
    Source,
    /// The new shard (before it exists: a node meant to host a replica).
    Target,
    /// The metadata group, which drives the split.
    Meta,
}

const PHASES: [Phase; 5] = [Phase::Planned, Phase::Created, Phase::Capturing, Phase::Frozen, Phase::Committed];

/// One cluster; five splits in a row (at "b", "c", "d", "e", "f", each on the
/// range the previous one created, or left), the victim killed while the
/// split is held in each phase in turn, and restarted.
async fn kill_at_every_phase(victim: Victim) {
    let hold = "planned=1000,created=1000,capturing=1200,frozen=800,committed=1000";
    let opts = ClusterOpts { extra_args: vec!["--fault-hold".into(), hold.into()], ..Default::default() };
    let started = Instant::now();
    let c = Cluster::start(3, opts).await;
    let ledger = Arc::new(Ledger::default());
    let keys: Vec<String> =
        ["a", "b", "c", "d", "e", "f"].iter().flat_map(|p| (0..25).map(move |i| format!("{p}/{i:02}"))).collect();
    preload(&c, &ledger, &keys, 0).await;
    let mut outcomes = Vec::new();

    for (phase, split_key) in PHASES.into_iter().zip(["b", "c", "d", "e", "f"]) {
        let before = ranges(&c).await;
        let range = range_of(&before, split_key).clone();
        assert_eq!(range.state, RangeState::Active, "{range:?}");

        let mut load = Load::start(&c, &ledger, &keys, &c.ids(), 2, 1);
        load.add_scanners(&c, &ledger, &keys, &c.ids(), 1);
        let acks = ledger.ack_count();
        wait_until(secs(20), "some writes before the split", || async { ledger.ack_count() >= acks + 10 }).await;
        let t = Instant::now();
        let id = start_split(&c, 1, json!({"key": split_key})).await;
        let v = wait_phase(&c, id, phase, secs(30)).await;
        let (_, _, source, target, _) = split_kind(&v);
        let group = match victim {
            Victim::Source => Some(source),
            Victim::Target => (phase != Phase::Planned).then_some(target),
            Victim::Meta => Some(0),
        };
        let node = match group {
            Some(g) => c.wait_for_group_leader(g, None, secs(10)).await,
            // Held in planned, the new shard does not exist yet: kill a node
            // that is to host one of its replicas.
            None => {
                let OpKind::Split { target_replicas, .. } = &v.op.kind;
                target_replicas[0].node_id
            }
        };
        let still = try_op(&c, id).await.map(|v| v.op.phase);
        c.kill(node);
        println!(
            "op {id}: killed node {node} ({victim:?}, group {group:?}) in {phase:?} (phase just before: {still:?})"
        );
        if let Some(g) = group {
            let new = c.wait_for_group_leader(g, Some(node), secs(20)).await;
            println!("op {id}: node {new} leads group {g} now");
        }
        c.restart_and_wait(node).await;
        let v = wait_ended(&c, id, secs(60)).await;
        println!("op {id} ended after {:?}: {}", t.elapsed(), describe(&v));
        // Past the commit point there is no way back.
        if v.op.entered(Phase::Committed).is_some() || still.is_some_and(|p| p >= Phase::Committed) {
            assert_eq!(v.op.phase, Phase::Done, "a committed split must finish: {}", describe(&v));
        }
        // Writes went on during the split (latency, not errors).
        let ended = v.op.history.last().map_or(u64::MAX, |h| h.1);
        let during = ledger.acks_between(v.op.history[0].1, ended, |_| true);
        let t1 = Instant::now();
        load.stop().await;
        let stopping = t1.elapsed();
        assert!(during > 0, "no write was acknowledged during op {id}");
        assert_split_outcome(&c, &v, &range).await;
        ledger.assert_no_violations();
        let t2 = Instant::now();
        wait_all_shards_led(&c, secs(20)).await;
        verify_ledger(&c, &ledger, node).await;
        println!("op {id}: load stopped in {stopping:?}, checked in {:?} ({:?} in all)", t2.elapsed(), t.elapsed());
        outcomes.push((phase, v.op.phase));
    }
    println!("{victim:?}: outcomes {outcomes:?} after {:?}; load: {}", started.elapsed(), ledger.summary());
    let rs = ranges(&c).await;
    let done = outcomes.iter().filter(|o| o.1 == Phase::Done).count();
    assert_eq!(rs.len(), 1 + done, "{rs:?}");
    for id in c.ids() {
        verify_ledger(&c, &ledger, id).await;
    }
    verify_scan(&c, &ledger, 2, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_survives_kills_of_the_source_leader_at_every_phase() {
    kill_at_every_phase(Victim::Source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_survives_kills_of_the_target_leader_at_every_phase() {
    kill_at_every_phase(Victim::Target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_survives_kills_of_the_metadata_leader_at_every_phase() {
    kill_at_every_phase(Victim::Meta).await;
}

/// The figures reported for a split (keys and bytes moved) survive a change
/// of the source shard's leader after the backfill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_progress_survives_a_source_leader_change() {
    let opts = ClusterOpts { extra_args: vec!["--fault-hold".into(), "capturing=2500".into()], ..Default::default() };
    let c = Cluster::start(3, opts).await;
    let ledger = Arc::new(Ledger::default());
    let keys: Vec<String> = (0..200).map(|i| format!("p/{i:03}")).collect();
    preload(&c, &ledger, &keys, 0).await;
    let id = start_split(&c, 1, json!({"key": "p/100"})).await;
    wait_phase(&c, id, Phase::Capturing, secs(20)).await;
    // The source leader ships the forward log (and sets this gauge) only
    // once the target has recorded the end of the backfill.
    let leader = c.wait_for_group_leader(FIRST_SHARD, None, secs(10)).await;
    wait_until(secs(10), format!("node {leader} to finish the backfill"), || async {
        c.metric_lines(leader, "cleave_split_forward_backlog{shard=\"1\"}").await.contains("cleave_split")
    })
    .await;
    let v = try_op(&c, id).await.expect("op");
    assert_eq!(v.op.phase, Phase::Capturing, "the split moved on too early: {}", describe(&v));
    c.kill(leader);
    c.wait_for_group_leader(FIRST_SHARD, Some(leader), secs(20)).await;
    c.restart_and_wait(leader).await;
    let v = wait_done(&c, id, secs(40)).await;
    println!("killed source leader node {leader} after the backfill; at the end: {}", describe(&v));
    verify_ledger(&c, &ledger, leader).await;
    let p = &v.op.progress;
    assert!(
        p.keys_copied == 100 && p.keys_total == 100 && p.bytes_copied > 0 && p.bytes_copied == p.bytes_total,
        "100 keys were copied, but after a change of source leader the split reports {p:?}"
    );
}

// ---------------------------------------------------------------------------
// 3. Cancel
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_before_commit_leaves_no_trace() {
    let opts = ClusterOpts { extra_args: vec!["--fault-hold".into(), "capturing=5000".into()], ..Default::default() };
    let c = Cluster::start(3, opts).await;
    let ledger = Arc::new(Ledger::default());
    let keys: Vec<String> = (0..200).map(|i| format!("{}{i:03}", ["c", "x"][i % 2])).collect();
    preload(&c, &ledger, &keys, 0).await;
    let before = ranges(&c).await;
    assert_eq!(before.len(), 1);
    let shards_before: BTreeSet<ShardId> = shards(&c).await.iter().map(|s| s.shard_id).collect();
    let groups_before = groups_per_node(&c).await;

    let mut load = Load::start(&c, &ledger, &keys, &c.ids(), 2, 1);
    load.add_scanners(&c, &ledger, &keys, &c.ids(), 1);
    let id = start_split(&c, 3, json!({"key": "m"})).await;
    let v = wait_phase(&c, id, Phase::Capturing, secs(30)).await;
    let (_, _, source, target, _) = split_kind(&v);
    assert_eq!(source, FIRST_SHARD);
    // The new shard's replicas exist now: one more group per replica node.
    let OpKind::Split { target_replicas, .. } = &v.op.kind;
    let target_nodes: BTreeSet<NodeId> = target_replicas.iter().map(|r| r.node_id).collect();
    wait_until(secs(5), "the new shard's replicas to exist", || async {
        let g = groups_per_node(&c).await;
        target_nodes.iter().all(|n| g[n] == groups_before[n] + 1)
    })
    .await;
    let busy = range_of(&ranges(&c).await, "m").clone();
    assert_eq!(busy.state, RangeState::Busy { op_id: id });
    // Cancel once the copy is done and writes are being forwarded (the
    // source leader sets this gauge only then).
    let leader = c.wait_for_group_leader(FIRST_SHARD, None, secs(10)).await;
    wait_until(secs(4), format!("node {leader} to forward writes to the new shard"), || async {
        c.metric_lines(leader, "cleave_split_forward_backlog{shard=\"1\"}").await.contains("cleave_split")
    })
    .await;

    let r = c.http.cancel_operation(&c.api(2), &id.to_string()).await.expect("cancel");
    assert_eq!(r.status, 200, "cancel during capturing: {r:?}");
    let cancelled: OperationView = r.json();
    assert_eq!(cancelled.op.phase, Phase::Aborted, "{}", describe(&cancelled));
    assert!(
        cancelled.op.error.as_deref().is_some_and(|e| !e.is_empty()),
        "no reason recorded: {}",
        describe(&cancelled)
    );
    let v = wait_ended(&c, id, secs(30)).await;
    assert_eq!(v.op.phase, Phase::Aborted);
    load.stop().await;
    println!("cancelled: {}; load: {}", describe(&v), ledger.summary());

    // No trace: the range as before (active, shard 1, same epoch), no new
    // shard, no new group on any node.
    assert_split_outcome(&c, &v, &before[0]).await;
    assert_eq!(ranges(&c).await, before);
    let shards_after: BTreeSet<ShardId> = shards(&c).await.iter().map(|s| s.shard_id).collect();
    assert_eq!(shards_after, shards_before);
    assert!(!shards_after.contains(&target));
    wait_until(secs(10), format!("cleave_groups back to {groups_before:?} on every node"), || async {
        groups_per_node(&c).await == groups_before
    })
    .await;

    // Everything is still readable, and writable on both sides of "m".
    for id in c.ids() {
        verify_ledger(&c, &ledger, id).await;
    }
    verify_scan(&c, &ledger, 1, 50).await;
    for (i, key) in ["c000", "x001", "new-left", "zz-new-right"].into_iter().enumerate() {
        let v = c.put_ok(c.ids()[i % 3], key, &json!({"after": "cancel"})).await;
        let item = c.read_retry(1, key, Some("linearizable"), secs(5)).await.item();
        assert_eq!((item.version, value_of(&item)), (v, json!({"after": "cancel"})));
    }
    let r = c.http.cancel_operation(&c.api(1), &id.to_string()).await.expect("cancel");
    println!("second cancel of an aborted op: HTTP {}", r.status);

    // A split that committed cannot be cancelled: 409, and it stays done.
    let id2 = start_split(&c, 1, json!({"key": "m"})).await;
    let done = wait_done(&c, id2, secs(40)).await;
    for via in c.ids() {
        let r = c.http.cancel_operation(&c.api(via), &id2.to_string()).await.expect("cancel");
        r.expect_error(409, ErrorCode::VersionConflict);
    }
    let after = try_op(&c, id2).await.expect("op");
    assert_eq!(after.op.phase, Phase::Done, "{}", describe(&after));
    assert_eq!(ranges(&c).await.len(), 2);
    assert_split_outcome(&c, &done, &before[0]).await;
    // An unknown operation: 404.
    let r = c.http.cancel_operation(&c.api(1), "987654").await.expect("cancel");
    r.expect_error(404, ErrorCode::NotFound);
}

/// A freeze that outlives its deadline aborts the split: writes to the
/// moving half are held (not applied anywhere) while frozen, then served by
/// the source again; nothing acknowledged is lost and nothing is left over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_past_its_deadline_aborts_and_the_source_serves_again() {
    let opts = ClusterOpts { extra_args: vec!["--fault-hold".into(), "frozen=6000".into()], ..Default::default() };
    let c = Cluster::start(3, opts).await;
    let ledger = Arc::new(Ledger::default());
    let keys: Vec<String> = (0..200).map(|i| format!("{}{i:03}", ["f", "t"][i % 2])).collect();
    preload(&c, &ledger, &keys, 0).await;
    let before = ranges(&c).await;
    let groups_before = groups_per_node(&c).await;

    let load = Load::start(&c, &ledger, &keys, &c.ids(), 4, 1);
    let id = start_split(&c, 2, json!({"key": "m"})).await;
    let v = wait_ended(&c, id, secs(40)).await;
    // Writes to the moving half resume after the abort.
    let aborted_at = v.op.entered(Phase::Aborted).unwrap_or_else(|| panic!("not aborted: {}", describe(&v)));
    wait_until(secs(20), "writes to the moving half after the abort", || async {
        ledger.acks_between(aborted_at, u64::MAX, |k| k >= "m") >= 20
    })
    .await;
    load.stop().await;
    println!("{}; load: {}", describe(&v), ledger.summary());
    assert_eq!(v.op.phase, Phase::Aborted, "{}", describe(&v));
    assert!(
        v.op.error.as_deref().is_some_and(|e| e.contains("freeze")),
        "aborted for another reason: {}",
        describe(&v)
    );
    assert!(v.op.write_pause_ms.is_none(), "{}", describe(&v));
    let frozen_at = v.op.entered(Phase::Frozen).expect("frozen");
    assert!(aborted_at - frozen_at >= 5_000, "aborted before the deadline: {}", describe(&v));

    // While frozen, no write to the moving half was applied (acks in flight
    // at the freeze get 500 ms); writes to the other half went on.
    let frozen_acks = ledger.acks_between(frozen_at + 500, aborted_at, |k| k >= "m");
    let other_acks = ledger.acks_between(frozen_at + 500, aborted_at, |k| k < "m");
    println!("acks while frozen: {frozen_acks} to the moving half, {other_acks} to the other");
    assert_eq!(frozen_acks, 0, "writes to a frozen range were acknowledged");
    assert!(other_acks > 0, "writes outside the frozen range stalled too");
    ledger.assert_no_violations();

    // No trace, and nothing lost.
    assert_split_outcome(&c, &v, &before[0]).await;
    assert_eq!(ranges(&c).await, before);
    wait_until(secs(10), format!("cleave_groups back to {groups_before:?}"), || async {
        groups_per_node(&c).await == groups_before
    })
    .await;
    assert_eq!(metric_sum(&c, "cleave_splits_aborted_total").await, 1.0);
    assert_eq!(metric_sum(&c, "cleave_splits_committed_total").await, 0.0);
    for id in c.ids() {
        verify_ledger(&c, &ledger, id).await;
    }
    verify_scan(&c, &ledger, 1, 64).await;
}

// ---------------------------------------------------------------------------
// 4. Repeated splits
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_splits_reach_16_ranges() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let ledger = Arc::new(Ledger::default());
    let keys: Vec<String> = (0..1000).map(|i| format!("k{i:04}")).collect();
    preload(&c, &ledger, &keys, 0).await;
    let initial_epoch = ranges(&c).await[0].epoch;
    let t = Instant::now();
    let mut splits = 0;
    loop {
        let rs = ranges(&c).await;
        if rs.len() >= 16 {
            break;
        }
        // Split the (up to) two ranges holding most keys, at their median.
        let mut by_keys: Vec<(usize, u64)> =
            rs.iter().map(|r| (keys.iter().filter(|k| r.contains(k)).count(), r.range_id)).collect();
        by_keys.sort_by(|a, b| b.cmp(a));
        let n = (16 - rs.len()).min(2).min(rs.len());
        let mut ops = Vec::new();
        for &(count, range_id) in &by_keys[..n] {
            assert!(count >= 2, "range {range_id} has {count} keys: {rs:?}");
            ops.push((start_split(&c, 1 + splits % 3, json!({"range_id": range_id})).await, range_id, count));
            splits += 1;
        }
        for (op, range_id, count) in ops {
            let v = wait_done(&c, op, secs(40)).await;
            let (r, key, ..) = split_kind(&v);
            assert_eq!(r, range_id);
            // At the median of the range's keys: both halves get keys.
            let range = rs.iter().find(|r| r.range_id == range_id).expect("range");
            let left = keys.iter().filter(|k| range.contains(k) && k.as_str() < key).count();
            assert!(
                left > 0 && left < count,
                "split of range {range_id} ({count} keys) at {key:?} leaves {left} on the left"
            );
        }
    }
    let rs = ranges(&c).await;
    println!("{splits} splits in {:?}; ranges: {:?}", t.elapsed(), rs.iter().map(|r| &r.start).collect::<Vec<_>>());
    assert_eq!(rs.len(), 16);
    for r in &rs {
        assert!(r.epoch > initial_epoch, "range {} was never split: {r:?}", r.range_id);
        assert_eq!(r.state, RangeState::Active);
    }
    let shard_ids: BTreeSet<ShardId> = rs.iter().map(|r| r.shard_id).collect();
    assert_eq!(shard_ids.len(), 16, "every range in its own shard: {rs:?}");

    // Every key exactly once, in order, with its value, across 16 shards.
    let items = verify_scan(&c, &ledger, 2, 7).await;
    assert_eq!(items.len(), 1000);
    verify_ledger(&c, &ledger, 3).await;

    // Each shard reports exactly the keys of its range (the source shards
    // deleted what they gave away), 1000 in all.
    let want: BTreeMap<ShardId, u64> =
        rs.iter().map(|r| (r.shard_id, keys.iter().filter(|k| r.contains(k)).count() as u64)).collect();
    let mut last = BTreeMap::new();
    let ok = tokio::time::timeout(secs(30), async {
        loop {
            if let Ok(shards) = c.http.admin_shards(&c.api(1)).await {
                last = shards.iter().map(|s| (s.shard_id, s.keys.unwrap_or(u64::MAX))).collect();
                if last == want {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "shard key counts {last:?} (sum {}), expected {want:?}", last.values().sum::<u64>());
    assert_eq!(want.values().sum::<u64>(), 1000);
}

// ---------------------------------------------------------------------------
// 5. A router with a stale directory
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_router_gets_a_stale_route_and_still_succeeds() {
    // Node 4 refreshes its directory once an hour: only a stale-route answer
    // makes it learn about a split. Three splits, each followed by a first
    // request through node 4 of another kind (read, write, scan) into the
    // moved half.
    let opts = ClusterOpts {
        node_args: vec![(4, vec!["--node-heartbeat-ms".into(), "3600000".into()])],
        ..Default::default()
    };
    let c = Cluster::start(4, opts).await;
    let stale_routes = || c.metric(4, "cleave_router_stale_routes_total");
    let mut model = Model::new();
    let keys: Vec<String> = ('a'..='z').flat_map(|ch| (0..4).map(move |i| format!("{ch}{i}"))).collect();
    for k in &keys {
        let value = json!({"v": 1, "k": k});
        assert_eq!(c.put_ok(4, k, &value).await, 1);
        model.put(k.clone(), value, 1);
    }
    model.assert_on(&c, 4, "linearizable", secs(5)).await;
    assert_eq!(stale_routes().await, 0.0);

    // Node 4 is live for 3 s after each of its rare heartbeats (one per
    // stale route); placing a new shard's replicas there would make the
    // split wait for a heartbeat that does not come (see
    // `split_reaches_a_new_shard_whose_leader_never_reported`), so each split
    // waits until node 4 no longer counts as live.
    async fn split_at(c: &Cluster, key: &str) {
        wait_until(secs(15), "node 4 to be no longer live", || async {
            let nodes = c.http.admin_nodes(&c.api(1)).await.ok();
            nodes.and_then(|ns| ns.into_iter().find(|n| n.id == 4)).is_some_and(|n| n.liveness != Liveness::Up)
        })
        .await;
        let before = range_of(&ranges(c).await, key).clone();
        let id = start_split(c, 1, json!({"key": key})).await;
        let v = wait_done(c, id, secs(40)).await;
        let OpKind::Split { target_replicas, .. } = &v.op.kind;
        assert!(target_replicas.iter().all(|r| r.node_id != 4), "{}", describe(&v));
        assert_split_outcome(c, &v, &before).await;
    }

    // A read of a moved key.
    split_at(&c, "m").await;
    let r = c.read_retry(4, "n1", Some("linearizable"), secs(10)).await;
    assert!(model.mismatch("n1", &r).is_none(), "GET n1 through node 4: {r:?}");
    let after_read = stale_routes().await;
    assert!(after_read > 0.0, "node 4 read a moved key without a stale route: {}", c.metric_lines(4, "stale").await);

    // A write of a moved key.
    split_at(&c, "t").await;
    let value = json!({"v": 2, "k": "u0"});
    assert_eq!(c.put_ok(4, "u0", &value).await, 2, "PUT u0 through the stale node 4");
    model.put("u0", value, 2);
    let after_write = stale_routes().await;
    assert!(after_write > after_read, "node 4 wrote a moved key without a stale route");

    // A scan across the moved boundary.
    split_at(&c, "f").await;
    let items = c.http.scan_all(&c.api(4), None, None, 10).await;
    let got: Vec<(String, u64, Value)> = items.iter().map(|i| (i.key.clone(), i.version, value_of(i))).collect();
    let want: Vec<(String, u64, Value)> = model
        .keys
        .iter()
        .map(|(k, e)| match e {
            Expected::Value { value, version } => (k.clone(), *version, value.clone()),
            Expected::Absent => unreachable!(),
        })
        .collect();
    assert_eq!(got, want, "scan through node 4 after a split it did not hear of");
    let after_scan = stale_routes().await;
    assert!(after_scan > after_write, "node 4 scanned moved keys without a stale route");
    println!("node 4 stale routes: after read {after_read}, after write {after_write}, after scan {after_scan}");

    // Everything through node 4 and another node: writes to every key, and
    // reads see them.
    for (i, k) in keys.iter().enumerate() {
        let version = match &model.keys[k] {
            Expected::Value { version, .. } => version + 1,
            Expected::Absent => unreachable!(),
        };
        let value = json!({"v": version, "k": k});
        let via = if i % 2 == 0 { 4 } else { 2 };
        assert_eq!(c.put_ok(via, k, &value).await, version, "PUT {k} through node {via}");
        model.put(k.clone(), value, version);
    }
    model.assert_on(&c, 4, "linearizable", secs(10)).await;
    model.assert_on(&c, 1, "linearizable", secs(10)).await;

    // Each shard holds exactly the keys of its range.
    let rs = ranges(&c).await;
    assert_eq!(rs.iter().map(|r| r.start.as_str()).collect::<Vec<_>>(), ["", "f", "m", "t"]);
    let want: BTreeMap<ShardId, u64> =
        rs.iter().map(|r| (r.shard_id, keys.iter().filter(|k| r.contains(k)).count() as u64)).collect();
    wait_until(secs(15), format!("shards to report key counts {want:?}"), || async {
        let shards = c.http.admin_shards(&c.api(1)).await.ok();
        shards.is_some_and(|s| {
            s.iter().map(|s| (s.shard_id, s.keys.unwrap_or(u64::MAX))).collect::<BTreeMap<_, _>>() == want
        })
    })
    .await;
}

/// The new shard's leader is on a node whose heartbeats are rare, and the
/// source shard's leader hosts no replica of the new shard: the source must
/// still find the new shard's leader (its replicas are in the operation)
/// rather than wait for a leader report from a heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_reaches_a_new_shard_whose_leader_never_reported() {
    let opts = ClusterOpts {
        node_args: vec![(4, vec!["--node-heartbeat-ms".into(), "3600000".into()])],
        ..Default::default()
    };
    let c = Cluster::start(4, opts).await;
    let ledger = Arc::new(Ledger::default());
    let keys: Vec<String> = ('a'..='z').map(|ch| format!("{ch}0")).collect();
    preload(&c, &ledger, &keys, 0).await;

    // Node 3 leads shard 1: kill its leader until it does.
    for attempt in 0.. {
        let l = c.wait_for_group_leader(FIRST_SHARD, None, secs(10)).await;
        if l == 3 {
            break;
        }
        assert!(attempt < 12, "node 3 never became the leader of shard 1");
        c.kill(l);
        c.wait_for_group_leader(FIRST_SHARD, Some(l), secs(15)).await;
        c.restart_and_wait(l).await;
    }
    // Node 4 reports once (at start, or when it first routes a request), so
    // for 3 s it is live and, hosting no group, first in line for the new
    // shard; nodes 1 and 2 come next (ties go to the lower id), node 3 not.
    c.kill(4);
    c.restart_and_wait(4).await;
    c.read_retry(4, "a0", Some("linearizable"), secs(10)).await.item();
    wait_until(secs(5), "every node to be live", || async {
        let nodes = c.http.admin_nodes(&c.api(1)).await.ok();
        nodes.is_some_and(|ns| ns.len() == 4 && ns.iter().all(|n| n.liveness == Liveness::Up))
    })
    .await;
    let id = start_split(&c, 1, json!({"key": "m"})).await;
    let v = try_op(&c, id).await.expect("op");
    let OpKind::Split { target_replicas, .. } = &v.op.kind;
    let targets: BTreeSet<NodeId> = target_replicas.iter().map(|r| r.node_id).collect();
    let source_leader = c.group_leader(FIRST_SHARD).await;
    println!("source leader {source_leader:?}, new shard on nodes {targets:?}");
    assert_eq!(targets, BTreeSet::from([1, 2, 4]), "placement other than expected: {}", describe(&v));
    assert_eq!(source_leader, Some(3), "shard 1 changed leader");

    let (_, _, _, target, _) = split_kind(&v);
    let target_leader = c.wait_for_group_leader(target, None, secs(10)).await;
    // Whether node 4's replica (the first, so the one that campaigns) wins
    // the first election is up to timing; only then is no other node able
    // to name the leader.
    println!(
        "the new shard {target} is led by node {target_leader}{}",
        if target_leader == 4 { "" } else { " (not node 4: the problem does not show in this run)" }
    );
    let v = wait_ended(&c, id, secs(20)).await;
    println!("{}", describe(&v));
    assert_eq!(v.op.phase, Phase::Done, "{}", describe(&v));
    verify_ledger(&c, &ledger, 4).await;
}

// ---------------------------------------------------------------------------
// 6. Automatic splits
// ---------------------------------------------------------------------------

/// Waits for an operation started for `reason` and returns its id.
async fn wait_auto_split(c: &Cluster, reason: &str, timeout: Duration) -> u64 {
    wait_for(timeout, format_args!("an automatic split for {reason:?}"), || async {
        let ops = c.http.admin_operations(&c.api(c.up_ids()[0])).await.ok()?;
        ops.iter()
            .find(|o| {
                let OpKind::Split { reason: r, .. } = &o.op.kind;
                r == reason
            })
            .map(|o| o.op.op_id)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_splits_by_size() {
    let opts = ClusterOpts { extra_args: vec!["--split-size".into(), "200000".into()], ..Default::default() };
    let c = Cluster::start(3, opts).await;
    let ledger = Arc::new(Ledger::default());
    // ~370 KB of live data.
    let keys: Vec<String> = (0..360).map(|i| format!("big/{i:04}")).collect();
    // Below the threshold (~160 KB): the shard reports its size, and no split
    // starts while the rebalancer (1 s tick) sees it for a few rounds.
    preload(&c, &ledger, &keys[..150], 1000).await;
    wait_until(secs(15), "shard 1 to report more than 150 KB", || async {
        let shards = c.http.admin_shards(&c.api(1)).await.ok();
        shards.and_then(|s| s.into_iter().find(|s| s.shard_id == FIRST_SHARD)?.size_bytes).is_some_and(|b| b > 150_000)
    })
    .await;
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(2500) {
        let ops = c.http.admin_operations(&c.api(2)).await.expect("ops");
        assert!(ops.is_empty(), "a split below --split-size: {:?}", ops.iter().map(describe).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Above it: a size split, at the median of the data.
    preload(&c, &ledger, &keys[150..], 1000).await;
    let t = Instant::now();
    let id = wait_auto_split(&c, "size", secs(30)).await;
    let v = wait_done(&c, id, secs(40)).await;
    println!("size split after {:?}: {}", t.elapsed(), describe(&v));
    let (_, key, ..) = split_kind(&v);
    assert!(key > "big/0090" && key < "big/0270", "split at {key:?}, far from the median of the data");
    let rs = ranges(&c).await;
    assert!(rs.len() >= 2, "{rs:?}");
    for r in &rs {
        assert!(keys.iter().any(|k| r.contains(k)), "a half without data: {rs:?}");
    }
    verify_ledger(&c, &ledger, 1).await;
    verify_scan(&c, &ledger, 2, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_splits_by_load() {
    let args = ["--split-qps", "100", "--split-qps-window", "2", "--split-size", "1000000000"];
    let opts = ClusterOpts { extra_args: args.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    let c = Cluster::start(3, opts).await;
    let ledger = Arc::new(Ledger::default());
    let keys: Vec<String> = (0..200).map(|i| format!("hot/{i:03}")).collect();
    preload(&c, &ledger, &keys, 0).await;
    assert!(c.http.admin_operations(&c.api(1)).await.expect("ops").is_empty(), "a split before any load");

    let load = Load::start(&c, &ledger, &keys, &c.ids(), 4, 4);
    let t = Instant::now();
    let id = wait_auto_split(&c, "load", secs(40)).await;
    let started_after = t.elapsed();
    let acks = ledger.ack_count();
    let v = wait_done(&c, id, secs(40)).await;
    let total = t.elapsed();
    load.stop().await;
    let rate = (ledger.ack_count() - acks) as f64 / (total - started_after).as_secs_f64().max(0.001);
    println!("load split started after {started_after:?}, done after {total:?} ({rate:.0} writes/s): {}", describe(&v));
    println!("load: {}", ledger.summary());
    let (_, key, ..) = split_kind(&v);
    // Uniform load over hot/000..hot/199: the median requested key is near
    // the middle.
    assert!(key > "hot/050" && key < "hot/150", "load split at {key:?}, far from the median of the load");
    let rs = ranges(&c).await;
    assert!(rs.len() >= 2, "{rs:?}");
    verify_ledger(&c, &ledger, 2).await;
    verify_scan(&c, &ledger, 3, 64).await;
}

// ---------------------------------------------------------------------------
// 7. Bad admin input
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_split_requests_get_json_4xx() {
    let opts = ClusterOpts { extra_args: vec!["--fault-hold".into(), "capturing=3000".into()], ..Default::default() };
    let c = Cluster::start(3, opts).await;

    // An empty range has no median key.
    for via in c.ids() {
        let r = c.http.admin_split(&c.api(via), json!({"range_id": 1}).to_string()).await.expect("split");
        r.expect_error(400, ErrorCode::BadRequest);
    }
    let long_key = "k".repeat(4097);
    let bodies: Vec<(String, u16)> = vec![
        ("{}".into(), 400),
        (json!({"key": "m", "range_id": 1}).to_string(), 400),
        (json!({"key": ""}).to_string(), 400),
        (json!({"key": 5}).to_string(), 400),
        (json!({"range_id": "one"}).to_string(), 400),
        (json!({"range_id": -1}).to_string(), 400),
        (json!({"keys": "m"}).to_string(), 400),
        (json!({"key": long_key}).to_string(), 413),
        ("not json".into(), 400),
        (String::new(), 400),
        (json!({"range_id": 424242}).to_string(), 404),
    ];
    for via in c.ids() {
        for (body, status) in &bodies {
            let r = c.http.admin_split(&c.api(via), body.clone()).await.expect("split");
            assert_eq!(r.status, *status, "POST /admin/split {:.80} through node {via}: {r:?}", body);
            r.error();
        }
        for path in ["/admin/operations/abc", "/admin/operations/-1", "/admin/operations/1.5"] {
            let r = c.http.get_path(&c.api(via), path).await.expect("GET");
            r.expect_error(400, ErrorCode::BadRequest);
        }
        let r = c.http.get_path(&c.api(via), "/admin/operations/987654").await.expect("GET");
        r.expect_error(404, ErrorCode::NotFound);
        c.http.cancel_operation(&c.api(via), "abc").await.expect("cancel").expect_error(400, ErrorCode::BadRequest);
        c.http.cancel_operation(&c.api(via), "987654").await.expect("cancel").expect_error(404, ErrorCode::NotFound);
    }
    assert!(c.http.admin_operations(&c.api(1)).await.expect("ops").is_empty(), "a bad request started a split");
    assert_eq!(ranges(&c).await.len(), 1);

    // A busy range: 409 by key and by range id, from every node.
    for k in ["a", "q", "z"] {
        c.put_ok(1, k, &json!(k)).await;
    }
    let id = start_split(&c, 1, json!({"key": "m"})).await;
    wait_phase(&c, id, Phase::Capturing, secs(20)).await;
    for via in c.ids() {
        for body in [json!({"key": "q"}), json!({"key": "c"}), json!({"range_id": 1})] {
            let r = c.http.admin_split(&c.api(via), body.to_string()).await.expect("split");
            r.expect_error(409, ErrorCode::VersionConflict);
        }
    }
    let v = wait_done(&c, id, secs(30)).await;
    let (_, _, _, _, new_range) = split_kind(&v);
    let ops = c.http.admin_operations(&c.api(2)).await.expect("ops");
    assert_eq!(ops.iter().map(|o| o.op.op_id).collect::<Vec<_>>(), vec![id], "{ops:?}");

    // A split key at the start of its range.
    for via in c.ids() {
        let r = c.http.admin_split(&c.api(via), json!({"key": "m"}).to_string()).await.expect("split");
        r.expect_error(400, ErrorCode::BadRequest);
    }
    assert_eq!(ranges(&c).await.len(), 2);
    // The range that was busy is free again: it splits.
    let id = start_split(&c, 3, json!({"key": "c"})).await;
    wait_done(&c, id, secs(30)).await;
    let rs = ranges(&c).await;
    assert_eq!(rs.iter().map(|r| r.start.as_str()).collect::<Vec<_>>(), ["", "c", "m"]);
    assert!(rs.iter().any(|r| r.range_id == new_range));

    // A JSON array is not a split request (serde would read `["x"]` as
    // `{"key": "x"}` by position). Checked last: while the server accepts
    // it, it starts a real split.
    let before = ranges(&c).await;
    for body in [r#"["x"]"#, "[null, 1]", "[]"] {
        let r = c.http.admin_split(&c.api(1), body).await.expect("split");
        assert_eq!(r.status, 400, "POST /admin/split {body}: {r:?}");
        r.error();
    }
    assert_eq!(ranges(&c).await, before);
}
