//! The split source's side: for every capture on a shard this node leads,
//! copy the moving range into the target shard and keep it caught up.
//!
//! A forwarder task first makes sure the target has a backfill — a copy of
//! the range read from one RocksDB snapshot of the source, shipped as table
//! files to every target replica and ingested there ([`sst`]), recorded in
//! the target's log with the snapshot's log index `s` and content digest —
//! then ships the source's
//! forward log after `s` (every write to the range since the snapshot; a
//! log entry's writes in one forward entry) to the target in log order.
//! The target applies every forwarded record as it comes — even one that
//! keeps the key's version, such as a transaction's lock — and ignores
//! batches at or below its watermark (which the backfill sets to `s`), so a
//! new forwarder (after a leader change) may resend anything.
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

use cleave_metadata::{OpId, OpKind, Replica};

use super::steps;
use crate::command::ShardCommand;
use crate::kv::{self, Capture, ForwardEntry, Incoming};
use crate::node::Node;
use crate::raft::SmState;
use crate::rpc::{self, ExecError, ForwardStatus, TargetStatus};
use crate::split::{receive, sst};
use crate::storage;

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
                    let ran = if cap.mirror {
                        super::mirror_status::run(&node, group, &cap, &status).await
                    } else {
                        run(&node, group, &cap, &status).await
                    };
                    if let Err(e) = ran {
                        tracing::debug!(group, op = cap.op_id, "forwarder stopped: {e}");
                    }
                    node.forwarders().running.lock().unwrap().remove(&key);
                });
            }
        }
    }
}

/// The size on disk of a capture's range, for progress (tables only: an
/// estimate).
pub fn range_size_estimate(db: &storage::Db, group: u64, cap: &Capture) -> u64 {
    let cf = storage::cf(db, storage::CF_DATA);
    let upper = cap.end.as_ref().map_or(kv::user_data_end(group), |e| storage::data_key(group, e.as_bytes()));
    let lower = storage::data_key(group, cap.start.as_bytes());
    db.get_approximate_sizes_cf(cf, &[rocksdb::Range::new(&lower, &upper)]).first().copied().unwrap_or(0)
}

/// The capture `op` of `group`, while this node leads the group.
pub fn current_capture(node: &Node, group: u64, op: OpId) -> Option<Capture> {
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

/// Ends the capture if its operation has ended (aborted or done): it is
/// an orphan — a BeginCapture that arrived after its abort, before shards
/// refused those. It would grow its forward log and block every later
/// split of the range (captures may not overlap). An ended operation never
/// runs again, so any directory that shows it ended is proof enough.
/// Answers whether it ended it.
///
/// The capture of a merge that committed (its source missed `Subsumed`,
/// say it had lost its quorum then) is not ended but completed: the range
/// is given up to the merged one, never served again here.
pub async fn end_orphan(node: &Node, group: u64, cap: &Capture) -> Result<bool, ExecError> {
    let dir = node.directory();
    let Some(op) = dir.ops.get(&cap.op_id).filter(|o| o.phase.is_terminal()) else { return Ok(false) };
    let step = match &op.kind {
        cleave_metadata::OpKind::Merge { merged: Some(merged), .. } if op.phase == cleave_metadata::Phase::Done => {
            ShardCommand::Subsumed { op_id: cap.op_id, merged: merged.clone() }
        }
        _ => ShardCommand::EndCapture { op_id: cap.op_id },
    };
    tracing::warn!(group, op = cap.op_id, "ending the capture of an operation that has ended");
    steps::shard_step(node, group, step, 0).await?;
    Ok(true)
}

async fn run(node: &Arc<Node>, group: u64, cap: &Capture, status: &Mutex<ForwardStatus>) -> Result<(), ExecError> {
    if end_orphan(node, group, cap).await? {
        return Ok(());
    }
    let TargetStatus { incoming, active, .. } = steps::incoming_status(node, cap.target, 0).await?;
    let Some(incoming) = incoming.filter(|i| i.op_id == cap.op_id) else {
        // The target is already serving (activated): nothing left to ship.
        return if active { Ok(()) } else { Err(ExecError::Unavailable("target is not receiving".into())) };
    };
    tracing::debug!(group, op = cap.op_id, "forwarder: target state read");
    // Forwarding starts after the backfill's snapshot: the entries up to it
    // are in the backfill (the target's watermark says so too).
    let (capture_base, snapshot_index) = match incoming.backfill {
        Some((s, _)) => {
            // Done by an earlier forwarder: take its figures from the target.
            let (keys, bytes) = incoming.backfill_copied;
            let mut st = status.lock().unwrap();
            (st.keys_copied, st.keys_total, st.bytes_copied, st.bytes_total) = (keys, keys, bytes, bytes);
            (incoming.capture_base, s)
        }
        None => {
            let attempt = rand::random::<u64>().max(1);
            status.lock().unwrap().attempt = attempt;
            let dir = sst::outbox_dir(&node.ctx().snapshot_root, group, cap.op_id, attempt);
            let copied = backfill(node, group, cap, attempt, &dir, status).await;
            // The files are staged at every replica (or the copy failed):
            // this node's copies are of no more use either way.
            let _ = tokio::task::spawn_blocking(move || sst::remove_dir(&dir)).await;
            let (w, files) = copied?;
            steps::shard_step(node, cap.target, w.command(cap.op_id, attempt, files), 0).await?;
            // The backfill the target recorded, which need not be this one:
            // another forwarder's (an earlier leader's, whose step was
            // delayed) may have landed first, and this one then changed
            // nothing. Forwarding goes on from the snapshot recorded.
            let recorded = steps::incoming_status(node, cap.target, 0).await?.incoming.filter(|i| i.op_id == cap.op_id);
            match recorded {
                Some(Incoming { backfill: Some((s, _)), capture_base, .. }) => (capture_base, s),
                _ => return Err(ExecError::Unavailable("the target recorded no backfill".into())),
            }
        }
    };
    tracing::debug!(group, op = cap.op_id, "forwarder: backfill done");
    let mut shipped = incoming.watermark.max(snapshot_index);
    {
        // With the backlog as it stands: reported done with none, the
        // driver would freeze before the first catch-up round, with every
        // write made during the backfill still to ship.
        // (As a distance: `shipped` is where the entries still to ship
        // begin, not the watermark, which is 0 after a fresh backfill.)
        let (last_seq, from) = backlog(&node.ctx().db, group, cap.op_id, shipped);
        let mut st = status.lock().unwrap();
        (st.last_seq, st.shipped) = (last_seq, from);
        st.backfill_done = true;
    }
    loop {
        let Some(cap_now) = current_capture(node, group, cap.op_id) else { return Ok(()) };
        let (entries, last_seq) = read_forward(node, group, cap.op_id, shipped + 1)?;
        if let Some((last, _)) = entries.last() {
            let batch =
                entries.iter().flat_map(|(_, e)| e.records.iter().map(|r| (r.key.clone(), r.record.clone()))).collect();
            let cmd = ShardCommand::Ingest { op_id: cap.op_id, source_index: Some(*last), records: batch };
            steps::shard_step(node, cap.target, cmd, 0).await?;
            metrics::counter!("cleave_split_forwarded_total").increment(entries.len() as u64);
            shipped = *last;
        }
        let complete = cap_now.frozen_at.is_some() && shipped >= last_seq;
        // The backlog as it is now, not as it was when the batch was read:
        // writes went on while it was shipped, and a driver that froze on
        // the older figure froze with a round's worth of writes still to
        // ship (629 at 256 MiB under load: 100 ms of the write pause).
        let drained = shipped >= last_seq;
        let last_seq =
            if entries.is_empty() { last_seq } else { last_seq.max(newest_forward(&node.ctx().db, group, cap.op_id)) };
        {
            let mut st = status.lock().unwrap();
            st.drained = drained;
            st.last_seq = last_seq;
            st.shipped = shipped;
            st.frozen_at = cap_now.frozen_at;
            st.frozen_ts = cap_now.frozen_ts;
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
        bytes += entry.records.iter().map(|r| r.record.len() + r.key.len()).sum::<usize>();
        out.push((seq, entry));
        if out.len() >= BATCH_RECORDS || bytes >= BATCH_BYTES {
            break;
        }
    }
    let last = newest_forward(db, group, op).max(out.last().map_or(0, |(s, _)| *s));
    Ok((out, last))
}

/// The backlog of `op`'s forward log beyond `shipped` (the target's
/// watermark), as (newest entry, index just before the first entry still
/// to ship): their difference is how many log indexes the target lags. A
/// fresh backfill has watermark 0 while the log may begin far on, so the
/// distance is measured from the first entry, not from 0.
fn backlog(db: &storage::Db, group: u64, op: OpId, shipped: u64) -> (u64, u64) {
    let newest = newest_forward(db, group, op).max(shipped);
    let first = first_forward(db, group, op, shipped + 1);
    (newest, first.map_or(newest, |f| f - 1).max(shipped))
}

/// An iterator over `op`'s forward log alone. The bounds matter for speed,
/// not only for correctness: the forward logs of earlier splits of the
/// group end deleted (range tombstones until compaction), and a seek
/// without a bound walks back through all of them (36 % of the metadata
/// leader node's CPU while making thousands of shards).
fn forward_log_iter(db: &storage::Db, group: u64, op: OpId) -> rocksdb::DBRawIterator<'_> {
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_lower_bound(kv::forward_key(group, op, 0));
    opts.set_iterate_upper_bound(kv::forward_key(group, op.wrapping_add(1), 0));
    db.raw_iterator_cf_opt(storage::cf(db, storage::CF_DATA), opts)
}

/// The index of the first entry of `op`'s forward log at or after `from`.
fn first_forward(db: &storage::Db, group: u64, op: OpId, from: u64) -> Option<u64> {
    let mut it = forward_log_iter(db, group, op);
    it.seek(kv::forward_key(group, op, from));
    forward_index(it.key(), group, op)
}

/// The index of the newest entry in `op`'s forward log (0: none).
fn newest_forward(db: &storage::Db, group: u64, op: OpId) -> u64 {
    let mut it = forward_log_iter(db, group, op);
    it.seek_to_last();
    forward_index(it.key(), group, op).unwrap_or(0)
}

/// The log index in `key`, if it is a key of `op`'s forward log.
fn forward_index(key: Option<&[u8]>, group: u64, op: OpId) -> Option<u64> {
    match key {
        Some(k) if k.len() == 8 + 2 + 16 && k[..k.len() - 8] == kv::forward_key(group, op, 0)[..k.len() - 8] => {
            Some(u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes")))
        }
        _ => None,
    }
}

/// Copies the captured range from one RocksDB snapshot to every replica
/// of the target, as table files staged beside each (`sst`): written
/// here under `dir`, each file shipped to all replicas as soon as it is
/// closed (a replica on this node links it instead). Returns what was
/// copied and the files, once every replica has every file.
async fn backfill(
    node: &Arc<Node>,
    group: u64,
    cap: &Capture,
    attempt: u64,
    dir: &std::path::Path,
    status: &Mutex<ForwardStatus>,
) -> Result<(sst::Written, Vec<sst::SstFile>), ExecError> {
    let directory = node.directory();
    let replicas = match directory.ops.get(&cap.op_id).map(|o| &o.kind) {
        Some(OpKind::Split { target_replicas, .. }) => Some(target_replicas.clone()),
        // A merge's target is the left shard, whose replicas stay put while
        // it runs (the shard is busy).
        Some(OpKind::Merge { left, .. }) => directory.shards.get(left).map(|s| s.replicas.clone()),
        _ => None,
    };
    let Some(replicas) = replicas else {
        return Err(ExecError::Unavailable(format!("operation {} is not in the directory here", cap.op_id)));
    };
    let db = node.ctx().db.clone();
    status.lock().unwrap().bytes_total = range_size_estimate(&db, group, cap);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u32, std::path::PathBuf, u64, (u64, u64))>(1);
    let (start, end, target, op_id) = (cap.start.clone(), cap.end.clone(), cap.target, cap.op_id);
    let (out, rate) = (dir.to_path_buf(), node.settings().backfill_bytes_per_s);
    let writer = crate::background::run(move || {
        let mut limit = sst::RateLimit::new(rate);
        let range = (start.as_str(), end.as_deref());
        sst::write_files(&db, group, target, op_id, attempt, range, &out, &mut limit, |n, p, len, so_far| {
            tx.blocking_send((n, p, len, so_far)).map_err(|_| std::io::Error::other("the backfill shipper stopped"))
        })
    });
    let mut files = Vec::new();
    while let Some((n, path, len, (records, bytes))) = rx.recv().await {
        if current_capture(node, group, cap.op_id).is_none() {
            return Err(ExecError::Unavailable("capture ended or leadership lost".into()));
        }
        let file = ship_file(node, cap, attempt, &replicas, n, &path).await?;
        if file.len != len {
            return Err(ExecError::Internal(format!("backfill file {n} changed while it was shipped")));
        }
        metrics::counter!("cleave_split_backfill_bytes_total").increment(file.len);
        let mut st = status.lock().unwrap();
        (st.keys_copied, st.bytes_copied) = (records, bytes);
        (st.keys_total, st.bytes_total) = (st.keys_total.max(records), st.bytes_total.max(bytes));
        files.push(file);
    }
    let written =
        writer.await.and_then(|r| r).map_err(|e| ExecError::Internal(format!("writing the backfill files: {e}")))?;
    let mut st = status.lock().unwrap();
    (st.keys_copied, st.keys_total) = (written.records, written.records);
    (st.bytes_copied, st.bytes_total) = (written.bytes, written.bytes);
    Ok((written, files))
}

/// Ships file `n` of a backfill to every target replica: linked in place
/// for a replica on this node; for the others, read once in chunks, each
/// chunk sent to all of them at once on the bulk lane, the file hashed as
/// it is read (the last chunk carries the hash). Returns the file's
/// description for the target's log.
async fn ship_file(
    node: &Arc<Node>,
    cap: &Capture,
    attempt: u64,
    replicas: &[Replica],
    n: u32,
    path: &std::path::Path,
) -> Result<sst::SstFile, ExecError> {
    let blocking = |e: tokio::task::JoinError| ExecError::Internal(e.to_string());
    let read_err = |e: std::io::Error| ExecError::Internal(format!("reading backfill file {n}: {e}"));
    let (local, remote): (Vec<&Replica>, Vec<&Replica>) = replicas.iter().partition(|r| r.node_id == node.id());
    let stage_local = async {
        for r in local {
            check_receiving(node, cap.target, r.replica_id, cap.op_id)?;
            let (root, path, target, op) =
                (node.ctx().snapshot_root.clone(), path.to_path_buf(), cap.target, cap.op_id);
            tokio::task::spawn_blocking(move || receive::stage_local(&root, target, op, attempt, n, &path))
                .await
                .map_err(blocking)?
                .map_err(|e| ExecError::Internal(format!("staging backfill file {n}: {e}")))?;
        }
        Ok::<_, ExecError>(())
    };
    let router = node.router();
    let send_remote = async {
        let p = path.to_path_buf();
        let reader =
            crate::background::run(move || sst::ChunkReader::open(&p)).await.and_then(|r| r).map_err(read_err)?;
        if reader.file_len() == 0 {
            // Never made (the last file holds the marker): it would reach
            // no remote replica, and they could not apply the entry.
            return Err(ExecError::Internal(format!("backfill file {n} is empty")));
        }
        let file_len = reader.file_len();
        // The next chunk is read while this one is sent.
        let read_next = |mut reader: sst::ChunkReader| {
            crate::background::run(move || {
                let next = reader.next_chunk();
                (reader, next)
            })
        };
        let mut reading = read_next(reader);
        loop {
            let (reader, next) = reading.await.map_err(read_err)?;
            let Some((offset, mut data)) = next.map_err(read_err)? else {
                return Err(ExecError::Internal(format!("backfill file {n} ended before its length")));
            };
            let done = reader.is_done();
            let hash = done.then(|| reader.hash());
            if crate::ops::faults::CORRUPT_BACKFILL.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(b) = data.last_mut() {
                    *b ^= 0x5a;
                }
            }
            let sends = remote.iter().map(|r| {
                let chunk = receive::Chunk {
                    group: cap.target,
                    replica_id: r.replica_id,
                    op_id: cap.op_id,
                    attempt,
                    file: n,
                    offset,
                    file_len,
                    hash,
                    data: data.clone(),
                };
                router.bulk_call(r.node_id, rpc::SplitChunk { chunk })
            });
            let sent = futures::future::try_join_all(sends);
            match hash {
                Some(hash) => {
                    sent.await?;
                    return Ok::<_, ExecError>(sst::SstFile { len: file_len, hash });
                }
                None => {
                    reading = read_next(reader);
                    sent.await?;
                }
            }
        }
    };
    let ((), file) = futures::future::try_join(stage_local, send_remote).await?;
    Ok(file)
}

/// Refuses unless this node holds replica `replica_id` of `group`, and it
/// is receiving operation `op` and has not recorded its backfill yet.
fn check_receiving(node: &Node, group: u64, replica_id: u64, op: OpId) -> Result<(), ExecError> {
    let g = node
        .group(group)
        .filter(|g| g.replica_id == replica_id)
        .ok_or_else(|| ExecError::Unavailable(format!("no replica {replica_id} of group {group} here")))?;
    let waiting = matches!(&*g.state.read().unwrap(),
        SmState::Shard(s) if s.incoming.as_ref().is_some_and(|i| i.op_id == op && i.backfill.is_none()));
    if !waiting {
        return Err(ExecError::Unavailable(format!("group {group} is not waiting for the backfill of operation {op}")));
    }
    Ok(())
}

/// Stages one chunk of a backfill file for a local replica (a target
/// replica's side of [`ship_file`]).
pub async fn receive_chunk(node: &Node, chunk: receive::Chunk) -> Result<(), ExecError> {
    check_receiving(node, chunk.group, chunk.replica_id, chunk.op_id)?;
    let (root, receiving) = (node.ctx().snapshot_root.clone(), node.receiving().clone());
    let _permit = receiving.permits.clone().acquire_owned().await.map_err(|e| ExecError::Internal(e.to_string()))?;
    crate::background::run(move || receive::receive_chunk(&root, &receiving, &chunk))
        .await
        .map_err(|e| ExecError::Internal(e.to_string()))?
        .map_err(|e| {
            if matches!(e, receive::ChunkError::Checksum { .. }) {
                tracing::warn!("refusing a split backfill file: {e}");
                metrics::counter!("cleave_split_backfill_refused_total").increment(1);
            }
            ExecError::Internal(e.to_string())
        })
}

/// Answers `SplitStatus` as the source shard's leader — the replica that
/// believes it leads, unconfirmed. A deposed leader's forwarder may answer
/// until it sees it lost the lead; what it reports holds all the same: a
/// digest only once its replica applied the freeze (the capture's digest
/// and forward log are then final, the same in every replica), and the
/// target's own state decides the commit.
pub async fn status(node: &Node, shard: u64, op: OpId, hops: u8) -> Result<ForwardStatus, ExecError> {
    node.router()
        .at_known_leader(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_db;

    const GROUP: u64 = 4;
    const OP: OpId = 9;

    /// Writes forward-log entries of `op` at `indexes` (empty values: only
    /// the keys matter here).
    fn log(db: &storage::Db, group: u64, op: OpId, indexes: impl IntoIterator<Item = u64>) {
        let cf = storage::cf(db, storage::CF_DATA);
        for i in indexes {
            db.put_cf(cf, kv::forward_key(group, op, i), b"").unwrap();
        }
    }

    #[test]
    fn the_backlog_is_a_distance_from_the_first_entry_still_to_ship() {
        let (_d, db) = temp_db();
        assert_eq!(backlog(&db, GROUP, OP, 0), (0, 0), "no forward log: nothing to ship");
        // The capture began long after the shard's first index: a fresh
        // backfill (watermark 0) lags by the entries there are, not by 150.
        log(&db, GROUP, OP, 100..=150);
        // Neighbours in the key space must not count: another operation's
        // log on the same shard, the same operation on the next shard.
        log(&db, GROUP, OP + 1, [10, 500]);
        log(&db, GROUP, OP - 1, [1, 900]);
        log(&db, GROUP + 1, OP, [1, 900]);
        let (newest, from) = backlog(&db, GROUP, OP, 0);
        assert_eq!((newest, from), (150, 99));
        assert_eq!(newest - from, 51, "51 entries still to ship");
        // Part of it shipped: the distance shrinks with it.
        assert_eq!(backlog(&db, GROUP, OP, 120), (150, 120));
        // All of it shipped.
        assert_eq!(backlog(&db, GROUP, OP, 150), (150, 150));
        // A watermark past the log's end (entries trimmed after shipping)
        // is never reported as a negative lag.
        assert_eq!(backlog(&db, GROUP, OP, 170), (170, 170));
    }

    #[test]
    fn forward_index_reads_only_keys_of_its_own_log() {
        let key = kv::forward_key(GROUP, OP, 42);
        assert_eq!(forward_index(Some(&key), GROUP, OP), Some(42));
        assert_eq!(forward_index(Some(&key), GROUP, OP + 1), None);
        assert_eq!(forward_index(Some(&key), GROUP + 1, OP), None);
        assert_eq!(forward_index(Some(&key[..key.len() - 1]), GROUP, OP), None, "a cut key");
        assert_eq!(forward_index(None, GROUP, OP), None);
    }
}
