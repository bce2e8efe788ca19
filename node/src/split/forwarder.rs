//! The split source's side: for every capture on a shard this node leads,
//! copy the moving range into the target shard and keep it caught up.
//!
//! A forwarder task first makes sure the target has a backfill — a copy of
//! the range read from one RocksDB snapshot of the source, together with the
//! snapshot's log index `s` and content digest — then ships the source's
//! forward log (every write to the range since the capture began) to the
//! target in log order. The target applies each record only if its version
//! is newer than what it has, and ignores forwarded batches at or below its
//! watermark, so backfill and forwarding may overlap and a new forwarder
//! (after a leader change) may resend anything.
//!
//! Verification: the source's digest of the range is the digest of the
//! data it holds, `capture_base + changes` — `changes` is kept by
//! `kv::apply` from the stored records of every write to the captured
//! range, `capture_base` is the digest when the capture began. Once the
//! range is frozen and every entry is shipped, it must equal the target's,
//! which the target computed from what it actually stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cleave_metadata::OpId;

use super::steps;
use crate::command::ShardCommand;
use crate::kv::{self, Capture, ForwardEntry};
use crate::node::Node;
use crate::raft::SmState;
use crate::rpc::{self, ExecError, ForwardStatus, TargetStatus};
use crate::split::digest;
use crate::storage::{self, data_key, state_key, tag, ValueRecord};

/// Records per backfill or forward batch, and bytes per batch.
const BATCH_RECORDS: usize = 2000;
const BATCH_BYTES: usize = 1 << 20;

/// Shared status of one running forwarder.
type SharedStatus = Arc<Mutex<ForwardStatus>>;

/// Running forwarders on this node, by (source shard, operation).
#[derive(Default)]
pub struct Forwarders {
    running: Mutex<HashMap<(u64, OpId), SharedStatus>>,
}

impl Forwarders {
    /// The status of a running forwarder.
    pub fn status(&self, shard: u64, op: OpId) -> Option<ForwardStatus> {
        self.running.lock().unwrap().get(&(shard, op)).map(|s| s.lock().unwrap().clone())
    }
}

/// Starts a forwarder for every capture of every shard this node leads.
pub async fn supervise(node: Arc<Node>) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        // A shard with a capture is awake: it never goes quiet while it has one.
        for g in node.groups().awake() {
            let captures: Vec<Capture> = match &*g.state.read().unwrap() {
                SmState::Shard(s) => s.captures.clone(),
                SmState::Meta(_) => continue,
            };
            if captures.is_empty() || !g.status().is_leader {
                continue;
            }
            for cap in captures {
                let key = (g.group, cap.op_id);
                let status = {
                    let mut running = node.forwarders().running.lock().unwrap();
                    if running.contains_key(&key) {
                        continue;
                    }
                    let status = Arc::new(Mutex::new(ForwardStatus::default()));
                    running.insert(key, status.clone());
                    status
                };
                let node = node.clone();
                let group = g.group;
                tokio::spawn(async move {
                    if let Err(e) = run(&node, group, &cap, &status).await {
                        tracing::debug!(group, op = cap.op_id, "forwarder stopped: {e}");
                    }
                    node.forwarders().running.lock().unwrap().remove(&key);
                });
            }
        }
    }
}

/// The capture `op` of `group`, while this node leads the group.
fn current_capture(node: &Node, group: u64, op: OpId) -> Option<Capture> {
    let g = node.group(group)?;
    if !g.status().is_leader {
        return None;
    }
    let state = g.state.read().unwrap();
    match &*state {
        SmState::Shard(s) => s.captures.iter().find(|c| c.op_id == op).cloned(),
        SmState::Meta(_) => None,
    }
}

async fn run(node: &Arc<Node>, group: u64, cap: &Capture, status: &Mutex<ForwardStatus>) -> Result<(), ExecError> {
    // A capture whose operation has ended (aborted or done) is an orphan —
    // a BeginCapture that arrived after its abort, before shards refused
    // those. It would grow its forward log and block every later split of
    // the range (captures may not overlap): end it. An ended operation never
    // runs again, so any directory that shows it ended is proof enough.
    if node.directory().ops.get(&cap.op_id).is_some_and(|o| o.phase.is_terminal()) {
        tracing::warn!(group, op = cap.op_id, "ending the capture of an operation that has ended");
        steps::shard_step(node, group, ShardCommand::EndCapture { op_id: cap.op_id }, 0).await?;
        return Ok(());
    }
    let TargetStatus { incoming, active, .. } = steps::incoming_status(node, cap.target, 0).await?;
    let Some(incoming) = incoming.filter(|i| i.op_id == cap.op_id) else {
        // The target is already serving (activated): nothing left to ship.
        return if active { Ok(()) } else { Err(ExecError::Unavailable("target is not receiving".into())) };
    };
    tracing::debug!(group, op = cap.op_id, "forwarder: target state read");
    let capture_base = match incoming.backfill {
        Some(_) => {
            // Done by an earlier forwarder: take its figures from the target.
            let (keys, bytes) = incoming.backfill_copied;
            let mut st = status.lock().unwrap();
            (st.keys_copied, st.keys_total, st.bytes_copied, st.bytes_total) = (keys, keys, bytes, bytes);
            incoming.capture_base
        }
        None => {
            let (s, d, base) = backfill(node, group, cap, status).await?;
            let (keys, bytes) = {
                let st = status.lock().unwrap();
                (st.keys_copied, st.bytes_copied)
            };
            let cmd = ShardCommand::BackfillDone {
                op_id: cap.op_id,
                snapshot_index: s,
                digest: d,
                capture_base: base,
                keys,
                bytes,
            };
            steps::shard_step(node, cap.target, cmd, 0).await?;
            base
        }
    };
    tracing::debug!(group, op = cap.op_id, "forwarder: backfill done");
    status.lock().unwrap().backfill_done = true;
    let mut shipped = incoming.watermark;
    loop {
        let Some(cap_now) = current_capture(node, group, cap.op_id) else { return Ok(()) };
        let (entries, last_seq) = read_forward(node, group, cap.op_id, shipped + 1)?;
        if let Some((last, _)) = entries.last() {
            let batch = entries.iter().map(|(_, e)| (e.key.clone(), e.record.clone())).collect();
            let cmd = ShardCommand::Ingest { op_id: cap.op_id, source_index: Some(*last), records: batch };
            steps::shard_step(node, cap.target, cmd, 0).await?;
            metrics::counter!("cleave_split_forwarded_total").increment(entries.len() as u64);
            shipped = *last;
        }
        let complete = cap_now.frozen_at.is_some() && shipped >= last_seq;
        {
            let mut st = status.lock().unwrap();
            st.last_seq = last_seq;
            st.shipped = shipped;
            st.frozen_at = cap_now.frozen_at;
            // The digest of the data this source holds in the range (not the
            // forward log's account of it): what the target must match.
            st.digest = complete.then_some(capture_base.wrapping_add(cap_now.changes));
        }
        metrics::gauge!("cleave_split_forward_backlog", "shard" => group.to_string())
            .set(last_seq.saturating_sub(shipped) as f64);
        if entries.is_empty() {
            let idle = if cap_now.frozen_at.is_some() { 1 } else { 5 };
            tokio::time::sleep(Duration::from_millis(idle)).await;
        }
    }
}

/// Forward-log entries of `op` from index `from` on (at most a batch), and
/// the index of the newest entry in the log.
fn read_forward(node: &Node, group: u64, op: OpId, from: u64) -> Result<(Vec<(u64, ForwardEntry)>, u64), ExecError> {
    let db = &node.ctx().db;
    let cf = storage::cf(db, storage::CF_DATA);
    let internal = |e: rocksdb::Error| ExecError::Internal(e.to_string());
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(kv::forward_key(group, op.wrapping_add(1), 0));
    let mut out = Vec::new();
    let mut bytes = 0;
    let start = kv::forward_key(group, op, from);
    for item in db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward)) {
        let (k, v) = item.map_err(internal)?;
        let seq = u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes"));
        let entry: ForwardEntry = crate::codec::decode(&v).map_err(|e| ExecError::Internal(e.to_string()))?;
        bytes += entry.record.len() + entry.key.len();
        out.push((seq, entry));
        if out.len() >= BATCH_RECORDS || bytes >= BATCH_BYTES {
            break;
        }
    }
    let mut it = db.raw_iterator_cf(cf);
    it.seek_for_prev(kv::forward_key(group, op, u64::MAX));
    let last = match it.key() {
        Some(k) if k.len() == 8 + 2 + 16 && k[..k.len() - 8] == kv::forward_key(group, op, 0)[..k.len() - 8] => {
            u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes"))
        }
        _ => 0,
    };
    let last = last.max(out.last().map_or(0, |(s, _)| *s));
    Ok((out, last))
}

/// Copies the captured range from one RocksDB snapshot into the target.
/// Returns the snapshot's applied index, the content digest it copied, and
/// the range's digest when the capture began (that digest less the
/// capture's changes up to the snapshot, read from the same snapshot).
async fn backfill(
    node: &Arc<Node>,
    group: u64,
    cap: &Capture,
    status: &Mutex<ForwardStatus>,
) -> Result<(u64, u64, u64), ExecError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<(String, Vec<u8>)>>(2);
    let db = node.ctx().db.clone();
    let (start, end) = (cap.start.clone(), cap.end.clone());
    let totals = Arc::new(Mutex::new((0u64, 0u64, 0u64)));
    let totals_in = totals.clone();
    let op_id = cap.op_id;
    let reader = tokio::task::spawn_blocking(move || -> Result<(u64, u64, u64), String> {
        let snap = db.snapshot();
        let meta_cf = storage::cf(&db, storage::CF_GROUP_META);
        let s = snap
            .get_cf(meta_cf, state_key(group, tag::APPLIED))
            .map_err(|e| e.to_string())?
            .and_then(|b| crate::raft::decode_applied_index(&b))
            .unwrap_or(0);
        let sm_state = snap.get_cf(meta_cf, state_key(group, tag::SM_STATE)).map_err(|e| e.to_string())?;
        let changes_at_s = match sm_state.map(|b| SmState::from_json(&b)).transpose().map_err(|e| e.to_string())? {
            Some(SmState::Shard(st)) => st.captures.iter().find(|c| c.op_id == op_id).map(|c| c.changes),
            _ => None,
        }
        .ok_or_else(|| format!("the backfill snapshot at {s} holds no capture of operation {op_id}"))?;
        let cf = storage::cf(&db, storage::CF_DATA);
        let upper = match &end {
            Some(e) => data_key(group, e.as_bytes()),
            None => kv::user_data_end(group),
        };
        let iter = |snap: &rocksdb::SnapshotWithThreadMode<'_, rocksdb::DB>| {
            let mut opts = rocksdb::ReadOptions::default();
            opts.set_iterate_upper_bound(upper.clone());
            opts.set_snapshot(snap);
            opts.fill_cache(false);
            db.iterator_cf_opt(
                cf,
                opts,
                rocksdb::IteratorMode::From(&data_key(group, start.as_bytes()), rocksdb::Direction::Forward),
            )
        };
        // Totals first (keys only), for progress reporting.
        let (mut keys_total, mut bytes_total) = (0u64, 0u64);
        for item in iter(&snap) {
            let (k, v) = item.map_err(|e| e.to_string())?;
            keys_total += 1;
            bytes_total += (k.len() - 8 + v.len()) as u64;
        }
        totals_in.lock().unwrap().0 = keys_total;
        totals_in.lock().unwrap().1 = bytes_total;
        let mut digest = 0u64;
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        for item in iter(&snap) {
            let (k, v) = item.map_err(|e| e.to_string())?;
            let key = String::from_utf8_lossy(storage::user_key_of(&k)).into_owned();
            if let Some(rec) = ValueRecord::decode(&v) {
                digest = digest.wrapping_add(digest::record_hash(&key, &rec));
            }
            bytes += key.len() + v.len();
            batch.push((key, v.to_vec()));
            if batch.len() >= BATCH_RECORDS || bytes >= BATCH_BYTES {
                if tx.blocking_send(std::mem::take(&mut batch)).is_err() {
                    return Err("backfill receiver gone".into());
                }
                bytes = 0;
            }
        }
        if !batch.is_empty() && tx.blocking_send(batch).is_err() {
            return Err("backfill receiver gone".into());
        }
        Ok((s, digest, digest.wrapping_sub(changes_at_s)))
    });
    while let Some(records) = rx.recv().await {
        if current_capture(node, group, cap.op_id).is_none() {
            return Err(ExecError::Unavailable("capture ended or leadership lost".into()));
        }
        let (n, b) = (records.len() as u64, records.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() as u64);
        steps::shard_step(node, cap.target, ShardCommand::Ingest { op_id: cap.op_id, source_index: None, records }, 0)
            .await?;
        metrics::counter!("cleave_split_backfill_bytes_total").increment(b);
        let (kt, bt, _) = *totals.lock().unwrap();
        let mut st = status.lock().unwrap();
        st.keys_copied += n;
        st.bytes_copied += b;
        st.keys_total = kt;
        st.bytes_total = bt;
    }
    reader.await.map_err(|e| ExecError::Internal(e.to_string()))?.map_err(ExecError::Internal)
}

/// Answers `SplitStatus` as the source shard's leader.
pub async fn status(node: &Node, shard: u64, op: OpId, hops: u8) -> Result<ForwardStatus, ExecError> {
    node.router()
        .at_leader(
            shard,
            hops,
            |hops| rpc::SplitStatus { shard, op_id: op, hops },
            |_| async move {
                node.forwarders()
                    .status(shard, op)
                    .ok_or(ExecError::Unavailable(format!("no forwarder for operation {op} on shard {shard} yet")))
            },
        )
        .await
}
