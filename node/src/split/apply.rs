//! How a shard applies the split steps of [`ShardCommand`]: captures and
//! freezes on the source, ingest and activation on the target.
//!
//! Everything here runs inside the state machine's apply, under the same
//! write batch as the rest of the entry batch, so a step and its data
//! changes are atomic. Every step is idempotent: a driver that resumes after
//! a crash may send it again. A step that belongs to an operation that has
//! ended here is refused: a `BeginCapture` delayed in an old connection must
//! not start a capture nobody will ever end.

use crate::command::{ShardCommand, StepError};
use crate::kv::{self, Applied, ApplyBatch, Capture, ShardState, StatsDelta};
use crate::split::digest;
use crate::storage::{self, data_key, Db, ValueRecord};

/// Deletes the forward log of operation `op`.
fn drop_forward_log(db: &Db, group: u64, op: u64, batch: &mut rocksdb::WriteBatch) {
    let cf = storage::cf(db, storage::CF_DATA);
    batch.delete_range_cf(cf, kv::forward_key(group, op, 0), kv::forward_key(group, op.wrapping_add(1), 0));
}

/// Deletes the user data of `group` in `[start, end)`.
fn delete_span(db: &Db, group: u64, start: &str, end: Option<&str>, batch: &mut rocksdb::WriteBatch) {
    let cf = storage::cf(db, storage::CF_DATA);
    let end = match end {
        Some(e) => data_key(group, e.as_bytes()),
        None => kv::user_data_end(group),
    };
    batch.delete_range_cf(cf, data_key(group, start.as_bytes()), end);
}

/// The backfill files an entry asks this replica to ingest before it is
/// applied: `(op, attempt, files)` of a `BackfillFiles` the replica is
/// waiting for (an entry of an earlier attempt, after the backfill was
/// recorded, ingests nothing). Decided from the state alone, like any apply.
pub fn backfill_files_to_ingest<'a>(
    state: &ShardState,
    cmd: &'a ShardCommand,
) -> Option<(u64, u64, &'a [crate::split::sst::SstFile])> {
    match cmd {
        ShardCommand::BackfillFiles { op_id, attempt, files, .. }
            if !files.is_empty()
                && state.incoming.as_ref().is_some_and(|i| i.op_id == *op_id && i.backfill.is_none()) =>
        {
            Some((*op_id, *attempt, files))
        }
        _ => None,
    }
}

/// Applies one split step at log `index`. Answers the entry index (for
/// `Freeze`, the freeze index).
pub fn apply(
    db: &Db,
    group: u64,
    index: u64,
    state: &mut ShardState,
    b: &mut ApplyBatch,
    cmd: &ShardCommand,
) -> Applied<u64, StepError> {
    let ApplyBatch { write: batch, overlay, stats, changed, mirror_figures, ts, .. } = b;
    match cmd {
        ShardCommand::BeginCapture { op_id, start, end, target }
        | ShardCommand::MirrorCapture { op_id, start, end, target } => {
            if state.captures.iter().any(|c| c.op_id == *op_id) {
                return Ok(Ok(index));
            }
            if state.has_ended(*op_id) {
                return Ok(Err(StepError::Ended { op_id: *op_id }));
            }
            if !state.owns(start, end.as_deref()) {
                return Ok(Err(StepError::NotOwned { start: start.clone(), end: end.clone() }));
            }
            if let Some(c) = state.captures.iter().find(|c| c.overlaps(start, end.as_deref())) {
                return Ok(Err(StepError::Overlaps { op_id: *op_id, running: c.op_id }));
            }
            let mirror = matches!(cmd, ShardCommand::MirrorCapture { .. });
            state.captures.push(Capture::new(*op_id, start.clone(), end.clone(), *target, mirror));
            *changed = true;
            Ok(Ok(index))
        }
        ShardCommand::Freeze { op_id } => {
            let Some(c) = state.captures.iter_mut().find(|c| c.op_id == *op_id) else {
                return Ok(Err(StepError::NoCapture { op_id: *op_id }));
            };
            if c.frozen_at.is_none() {
                let locked: Vec<String> = state.open_locks.keys().filter(|k| c.covers(k)).cloned().collect();
                if !locked.is_empty() {
                    c.freezing = true;
                    *changed = true;
                    return Ok(Err(StepError::Locked { op_id: *op_id, keys: locked }));
                }
                c.frozen_at = Some(index);
                c.frozen_ts = *ts;
                *changed = true;
            }
            Ok(Ok(c.frozen_at.unwrap_or(index)))
        }
        ShardCommand::EndCapture { op_id } => {
            state.captures.retain(|c| c.op_id != *op_id);
            state.end_op(*op_id);
            drop_forward_log(db, group, *op_id, batch);
            *changed = true;
            Ok(Ok(index))
        }
        ShardCommand::SplitDone { op_id, left, moved, moved_keys, moved_bytes } => {
            // Applied already: the moved range is remembered, and the
            // operation has ended here (a merge taking the range back
            // forgets the first, never the second).
            let done = state.moved.iter().any(|m| m.range_id == moved.range_id && m.epoch == moved.epoch);
            if done || state.has_ended(*op_id) {
                return Ok(Ok(index));
            }
            delete_span(db, group, &moved.start, moved.end.as_deref(), batch);
            overlay.retain(|k, _| !moved.contains(k));
            drop_forward_log(db, group, *op_id, batch);
            state.captures.retain(|c| c.op_id != *op_id);
            state.end_op(*op_id);
            state.ranges.retain(|r| r.range_id != left.range_id);
            state.ranges.push(left.clone());
            state.ranges.sort_by(|a, b| a.start.cmp(&b.start));
            state.moved.retain(|m| m.range_id != moved.range_id);
            state.moved.push(moved.clone());
            stats.add(StatsDelta { keys: -(*moved_keys as i64), bytes: -(*moved_bytes as i64) });
            *changed = true;
            Ok(Ok(index))
        }
        ShardCommand::Ingest { op_id, source_index, records } => {
            let inc = match &mut state.incoming {
                Some(inc) if inc.op_id == *op_id => inc,
                _ if !state.ranges.is_empty() => return Ok(Ok(index)), // already activated: late redelivery
                _ => return Ok(Err(StepError::NotReceiving { op_id: *op_id })),
            };
            if source_index.is_some_and(|i| i <= inc.watermark) {
                return Ok(Ok(index));
            }
            if source_index.is_some() && inc.backfill.is_none() {
                // Forwarded writes come after the backfill: ingested files
                // would otherwise lie over them.
                return Ok(Err(StepError::BeforeBackfill { op_id: *op_id }));
            }
            // The records come with the command, not from this replica's
            // storage: one that does not decode refuses the batch (the same
            // on every replica), it does not stop them all.
            let mut decoded = Vec::with_capacity(records.len());
            for (key, bytes) in records {
                match ValueRecord::decode(bytes) {
                    Some(r) => decoded.push(r),
                    None => return Ok(Err(StepError::BadRecord { op_id: *op_id, key: key.clone() })),
                }
            }
            for ((key, bytes), new) in records.iter().zip(decoded) {
                let inside = key.as_str() >= inc.start.as_str() && inc.end.as_deref().is_none_or(|e| key.as_str() < e);
                if !inside {
                    continue;
                }
                let cur = kv::current(db, group, overlay, key)?;
                // A backfill record older than what is here is not taken (a
                // redelivered chunk). A forwarded one is, even at the same
                // version (a write that changes only a lock keeps it): a
                // forwarded batch is a contiguous run of the source's log
                // replayed in order, so it ends with every key it names as
                // the source had it at the batch's last index, even when it
                // begins before the backfill's snapshot.
                let same = cur.as_ref() == Some(&new);
                if same || source_index.is_none() && cur.as_ref().is_some_and(|c| c.version >= new.version) {
                    continue;
                }
                inc.digest = inc.digest.wrapping_add(digest::delta(key, cur.as_ref(), &new));
                let d = StatsDelta::replace(key, cur.as_ref(), &new);
                inc.add_live(d);
                stats.add(d);
                kv::write_record(db, batch, group, key, &new, bytes);
                overlay.insert(key.clone(), new);
            }
            if let Some(i) = source_index {
                inc.watermark = *i;
            }
            *changed = true;
            Ok(Ok(index))
        }
        ShardCommand::BackfillDone { op_id, snapshot_index, digest, capture_base, keys, bytes } => {
            if let Some(inc) = state.incoming.as_mut().filter(|i| i.op_id == *op_id && i.backfill.is_none()) {
                inc.backfill = Some((*snapshot_index, *digest));
                inc.watermark = inc.watermark.max(*snapshot_index);
                inc.capture_base = *capture_base;
                inc.backfill_copied = (*keys, *bytes);
                *changed = true;
            }
            Ok(Ok(index))
        }
        ShardCommand::BackfillFiles {
            op_id,
            snapshot_index,
            digest,
            capture_base,
            keys,
            bytes,
            live: (live_keys, live_bytes),
            files,
            ..
        } => {
            // The files were ingested just before (`backfill_files_to_ingest`,
            // the state machine): record them. The marker they carried has
            // done its work (a replay of this entry would find it) once this
            // batch lands with the applied index past the entry.
            if files.is_empty() {
                // Every backfill has a file (the marker's): one without any
                // was not made by a forwarder, and ingests nothing.
                return Ok(Err(StepError::BeforeBackfill { op_id: *op_id }));
            }
            if let Some(inc) = state.incoming.as_mut().filter(|i| i.op_id == *op_id && i.backfill.is_none()) {
                inc.backfill = Some((*snapshot_index, *digest));
                // What the log holds up to the snapshot is in the files.
                inc.watermark = inc.watermark.max(*snapshot_index);
                inc.digest = inc.digest.wrapping_add(*digest);
                inc.capture_base = *capture_base;
                inc.backfill_copied = (*keys, *bytes);
                let live = StatsDelta { keys: *live_keys as i64, bytes: *live_bytes as i64 };
                inc.add_live(live);
                stats.add(live);
                state.files_at = Some(index);
                batch.delete_cf(storage::cf(db, storage::CF_DATA), kv::backfill_marker_key(group, *op_id));
                *changed = true;
            }
            Ok(Ok(index))
        }
        ShardCommand::Activate { op_id, ranges } => {
            match &mut state.incoming {
                Some(inc) if inc.op_id == *op_id => {
                    if inc.mirror_of.is_some() {
                        // Filled beside the source on this node: what is
                        // here was found complete before the entry applied.
                        let Some(f) = mirror_figures.get(op_id) else {
                            return Err(std::io::Error::other(format!(
                                "operation {op_id}: the mirrored range is not complete on this node"
                            )));
                        };
                        inc.live = (f.keys, f.bytes);
                        inc.digest = f.digest;
                        stats.add(StatsDelta { keys: f.keys as i64, bytes: f.bytes as i64 });
                        crate::split::mirror::delete_record(db, batch, group);
                        // A replica added later has no source beside it to
                        // replay this from: it must be sent a snapshot
                        // (as after backfill files).
                        state.files_at = Some(index);
                    }
                    state.received =
                        Some(Box::new(kv::Received { op_id: *op_id, keys: inc.live.0, bytes: inc.live.1 }));
                    // Changes of the range up to now are the source's (the
                    // driver stamps this entry above its freeze).
                    state.born = inc.source.map(|from| {
                        Box::new(kv::Born { from, start: inc.start.clone(), end: inc.end.clone(), ts: *ts })
                    });
                    state.ranges = ranges.clone();
                    state.incoming = None;
                    *changed = true;
                }
                _ if !state.ranges.is_empty() => {}
                _ => return Ok(Err(StepError::NotReceiving { op_id: *op_id })),
            }
            Ok(Ok(index))
        }
        // The entry's timestamp is the close: taken by the state machine.
        ShardCommand::Close => Ok(Ok(index)),
        ShardCommand::TrimChanges { from, through, bytes } => {
            if *from == state.change_log.trimmed_through && *through > *from {
                crate::watch::changes::trim(db, batch, group, *through);
                state.change_log.trimmed_through = *through;
                state.change_log.bytes = state.change_log.bytes.saturating_sub(*bytes);
                // A watch behind an absorption is now behind the trim too.
                state.absorbed.retain(|a| a.since > *through);
                *changed = true;
            }
            Ok(Ok(index))
        }
        ShardCommand::BeginAbsorb { op_id, start, end, source } => {
            match &state.incoming {
                Some(i) if i.op_id == *op_id => return Ok(Ok(index)),
                Some(i) => return Ok(Err(StepError::Overlaps { op_id: *op_id, running: i.op_id })),
                None => {}
            }
            if state.has_ended(*op_id) {
                return Ok(Err(StepError::Ended { op_id: *op_id }));
            }
            if state.ranges.iter().any(|r| r.overlaps(start, end.as_deref())) {
                return Ok(Err(StepError::Owned { start: start.clone(), end: end.clone() }));
            }
            let incoming =
                kv::Incoming { source: Some(*source), ..kv::Incoming::new(*op_id, start.clone(), end.clone()) };
            state.incoming = Some(incoming);
            *changed = true;
            Ok(Ok(index))
        }
        ShardCommand::Absorb { op_id, ranges, since } => {
            // The new ranges must hold the shard's own and the absorbed one:
            // an absorb built from an older directory would drop them.
            let covered =
                |s: &str, e: Option<&str>| ranges.iter().any(|r| kv::span_within(s, e, &r.start, r.end.as_deref()));
            match state.incoming.take() {
                Some(inc) if inc.op_id == *op_id => {
                    let own = state.ranges.iter().all(|r| covered(&r.start, r.end.as_deref()));
                    if !own || !covered(&inc.start, inc.end.as_deref()) {
                        let (start, end) = (inc.start.clone(), inc.end.clone());
                        state.incoming = Some(inc);
                        return Ok(Err(StepError::NotOwned { start, end }));
                    }
                    // What it handed away earlier within the absorbed range
                    // is its own again.
                    state.moved.retain(|m| !covered(&m.start, m.end.as_deref()));
                    let from = inc.source.unwrap_or_default();
                    state.absorbed.push(kv::Absorbed { start: inc.start, end: inc.end, since: *since, from });
                    state.ranges = ranges.clone();
                    state.ranges.sort_by(|a, b| a.start.cmp(&b.start));
                    state.end_op(*op_id);
                    *changed = true;
                }
                other => {
                    state.incoming = other;
                    if !state.has_ended(*op_id) {
                        return Ok(Err(StepError::NotReceiving { op_id: *op_id }));
                    }
                }
            }
            Ok(Ok(index))
        }
        ShardCommand::DropAbsorbed { op_id } => {
            if let Some(inc) = state.incoming.take_if(|i| i.op_id == *op_id) {
                delete_span(db, group, &inc.start, inc.end.as_deref(), batch);
                overlay.retain(|k, _| !kv::within(k, &inc.start, inc.end.as_deref()));
                stats.add(StatsDelta { keys: -(inc.live.0 as i64), bytes: -(inc.live.1 as i64) });
            }
            state.end_op(*op_id);
            *changed = true;
            Ok(Ok(index))
        }
        ShardCommand::Subsumed { op_id, merged } => {
            if state.moved.iter().any(|m| m.range_id == merged.range_id && m.epoch == merged.epoch) {
                return Ok(Ok(index));
            }
            // The merged range must hold what this shard captured for the
            // merge: one built from an older directory would unfreeze the
            // range and give nothing up.
            let inside = |s: &str, e: Option<&str>| kv::span_within(s, e, &merged.start, merged.end.as_deref());
            match state.captures.iter().find(|c| c.op_id == *op_id) {
                Some(c) if inside(&c.start, c.end.as_deref()) => {}
                Some(c) => return Ok(Err(StepError::NotOwned { start: c.start.clone(), end: c.end.clone() })),
                None if state.has_ended(*op_id) => return Ok(Ok(index)),
                None => return Ok(Err(StepError::NoCapture { op_id: *op_id })),
            }
            for r in state
                .ranges
                .iter()
                .filter(|r| kv::span_within(&r.start, r.end.as_deref(), &merged.start, merged.end.as_deref()))
            {
                delete_span(db, group, &r.start, r.end.as_deref(), batch);
            }
            overlay.retain(|k, _| !merged.contains(k));
            drop_forward_log(db, group, *op_id, batch);
            state.captures.retain(|c| c.op_id != *op_id);
            state.end_op(*op_id);
            state.ranges.retain(|r| !kv::span_within(&r.start, r.end.as_deref(), &merged.start, merged.end.as_deref()));
            state.moved.retain(|m| !kv::span_within(&m.start, m.end.as_deref(), &merged.start, merged.end.as_deref()));
            state.moved.push(merged.clone());
            *changed = true;
            Ok(Ok(index))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{KvCommand, KvError};
    use crate::testing::{forward_indexes, put, step, temp_db, whole_shard, GROUP};

    fn begin(op_id: u64, start: &str, end: Option<&str>) -> ShardCommand {
        ShardCommand::BeginCapture { op_id, start: start.into(), end: end.map(Into::into), target: 9 }
    }

    #[test]
    fn a_begin_capture_delayed_past_its_abort_is_refused() {
        let (_d, db) = temp_db();
        let mut s = whole_shard();
        assert_eq!(step(&db, &mut s, 1, begin(5, "m", None)), Ok(1));
        assert_eq!(step(&db, &mut s, 2, ShardCommand::EndCapture { op_id: 5 }), Ok(2));
        // The frame held back in an old connection arrives now.
        assert_eq!(step(&db, &mut s, 3, begin(5, "m", None)), Err(StepError::Ended { op_id: 5 }));
        assert!(s.captures.is_empty(), "no orphaned capture");
        put(&db, &mut s, 4, "n", "1").unwrap();
        assert!(forward_indexes(&db, 5).is_empty(), "nothing logged for the ended operation");
        // An abort that reached the source before its capture ever began
        // also fences the late BeginCapture.
        assert_eq!(step(&db, &mut s, 5, ShardCommand::EndCapture { op_id: 6 }), Ok(5));
        assert_eq!(step(&db, &mut s, 6, begin(6, "m", None)), Err(StepError::Ended { op_id: 6 }));
        // A later operation of the same range captures normally.
        assert_eq!(step(&db, &mut s, 7, begin(7, "m", None)), Ok(7));
        assert_eq!(step(&db, &mut s, 8, begin(7, "m", None)), Ok(8), "a retry is harmless");
        assert_eq!(s.captures.len(), 1);
    }

    /// Records travel inside the `Ingest` command: bytes that do not decode
    /// refuse the whole batch, the same on every replica, and store nothing
    /// (a storage error here would stop every replica of the target).
    #[test]
    fn an_ingest_with_an_undecodable_record_is_refused_whole() {
        let (_d, db) = temp_db();
        let mut s = ShardState { incoming: Some(kv::Incoming::new(5, "m".into(), None)), ..Default::default() };
        let good = ValueRecord::live(1, b"1".to_vec()).encode();
        let records = vec![("n".to_string(), good), ("o".to_string(), b"not a record".to_vec())];
        let cmd = ShardCommand::Ingest { op_id: 5, source_index: None, records };
        assert_eq!(step(&db, &mut s, 1, cmd), Err(StepError::BadRecord { op_id: 5, key: "o".into() }));
        assert_eq!(kv::read(&db, GROUP, "n").unwrap(), None, "nothing of the batch stored");
        assert_eq!(s.incoming.unwrap().digest, 0);
    }

    #[test]
    fn a_mirrored_target_activates_with_its_copys_figures_and_only_with_them() {
        let (_d, db) = temp_db();
        let incoming = kv::Incoming { mirror_of: Some(1), ..kv::Incoming::new(5, "m".into(), None) };
        let mut s = ShardState { incoming: Some(incoming), ..Default::default() };
        let activate = ShardCommand::Activate { op_id: 5, ranges: vec![crate::testing::range(2, "m", None, 2)] };
        // Without the figures found complete beside the source: a storage
        // error (the replica stops), never an empty shard serving.
        let mut b = ApplyBatch::default();
        assert!(apply(&db, GROUP, 7, &mut s, &mut b, &activate).is_err());
        let mut b = ApplyBatch::default();
        let figures = crate::split::mirror::Figures { keys: 3, bytes: 40, digest: 9, copied: 50 };
        b.mirror_figures.insert(5, figures);
        assert_eq!(apply(&db, GROUP, 8, &mut s, &mut b, &activate).unwrap(), Ok(8));
        assert_eq!(b.stats, StatsDelta { keys: 3, bytes: 40 }, "the copy's keys and bytes are the shard's");
        assert_eq!(s.received.as_deref().map(|r| (r.keys, r.bytes)), Some((3, 40)));
        assert!(s.incoming.is_none() && s.ranges.len() == 1);
        // A replica added later cannot replay the activation (no source
        // beside it): it is sent a snapshot past this entry.
        assert_eq!(s.files_at, Some(8));
    }

    #[test]
    fn ended_operations_are_remembered_beyond_the_kept_list() {
        let mut s = whole_shard();
        for op in 1..=(kv::ENDED_KEPT as u64 * 3) {
            s.end_op(op);
        }
        assert_eq!(s.ended_ops.len(), kv::ENDED_KEPT);
        assert!((1..=kv::ENDED_KEPT as u64 * 3).all(|op| s.has_ended(op)));
        assert!(!s.has_ended(kv::ENDED_KEPT as u64 * 3 + 1));
    }

    #[test]
    fn overlapping_captures_are_refused() {
        let (_d, db) = temp_db();
        let mut s = whole_shard();
        assert_eq!(step(&db, &mut s, 1, begin(5, "m", None)), Ok(1));
        assert_eq!(step(&db, &mut s, 2, begin(6, "p", None)), Err(StepError::Overlaps { op_id: 6, running: 5 }));
        assert_eq!(step(&db, &mut s, 3, begin(6, "a", Some("q"))), Err(StepError::Overlaps { op_id: 6, running: 5 }));
        assert_eq!(step(&db, &mut s, 4, begin(6, "a", Some("m"))), Ok(4), "adjacent ranges do not overlap");
        assert_eq!(s.captures.len(), 2);
    }

    #[test]
    fn a_write_is_logged_for_every_capture_covering_it_and_refused_if_any_is_frozen() {
        let (_d, db) = temp_db();
        // Two overlapping captures, as a node before the fix could be left
        // with (an orphaned X, then Y of the same range).
        let mut s = whole_shard();
        for (op, start) in [(5, "m"), (6, "p")] {
            s.captures.push(kv::Capture::new(op, start.into(), None, 9, false));
        }
        put(&db, &mut s, 10, "q", "1").unwrap();
        assert_eq!(forward_indexes(&db, 5), vec![10]);
        assert_eq!(forward_indexes(&db, 6), vec![10], "the write reaches Y's target too");
        assert_eq!(s.captures[0].changes, s.captures[1].changes);
        assert_eq!(step(&db, &mut s, 11, ShardCommand::Freeze { op_id: 6 }), Ok(11));
        assert_eq!(put(&db, &mut s, 12, "q", "2"), Err(KvError::RangeMoving), "Y's freeze holds in X ∩ Y");
        assert!(put(&db, &mut s, 13, "n", "2").is_ok(), "only X covers n, and X is not frozen");
    }

    #[test]
    fn a_capture_accounts_for_the_data_the_source_holds() {
        let (_d, db) = temp_db();
        let mut s = whole_shard();
        for (i, k) in ["a", "m", "n", "z"].iter().enumerate() {
            put(&db, &mut s, i as u64 + 1, k, "0").unwrap();
        }
        let base = stored_digest(&db, "m");
        assert_eq!(step(&db, &mut s, 10, begin(5, "m", None)), Ok(10));
        put(&db, &mut s, 11, "m", "1").unwrap();
        put(&db, &mut s, 12, "o", "\"new\"").unwrap();
        put(&db, &mut s, 13, "b", "1").unwrap(); // outside the capture
        let cmd =
            KvCommand { range_id: 1, epoch: 1, op: crate::command::KvOp::Delete { key: "z".into(), if_version: None } };
        let mut b = ApplyBatch::default();
        kv::apply(&db, GROUP, 14, &mut s, &mut b, &cmd).unwrap().unwrap();
        db.write(b.write).unwrap();
        assert_eq!(base.wrapping_add(s.captures[0].changes), stored_digest(&db, "m"));
    }

    /// The digest of every record stored for `GROUP` in `[start, ∞)`,
    /// tombstones too (the digest covers what a split copies).
    fn stored_digest(db: &Db, start: &str) -> u64 {
        let cf = storage::cf(db, storage::CF_DATA);
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(kv::user_data_end(GROUP));
        let from = data_key(GROUP, start.as_bytes());
        db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward)).fold(
            0u64,
            |d, i| {
                let (k, v) = i.unwrap();
                let key = String::from_utf8(storage::user_key_of(&k).to_vec()).unwrap();
                d.wrapping_add(digest::record_hash(&key, &ValueRecord::decode(&v).unwrap()))
            },
        )
    }

    #[test]
    fn a_storage_error_in_apply_is_not_an_answer() {
        use std::io::{Read, Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        {
            let db = storage::open(dir.path()).unwrap();
            let mut s = whole_shard();
            // An incompressible value, so the data block spans the first
            // few KiB of the table file.
            let mut seed = crate::testing::NOISE_SEED;
            let noise = crate::testing::noise(&mut seed, 8000);
            put(&db, &mut s, 1, "k", &format!("\"{noise}\"")).unwrap();
            db.flush_cf(storage::cf(&db, storage::CF_DATA)).unwrap();
        }
        // Damage the data block of every table file (as a bad disk would).
        for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "sst") {
                let mut f = std::fs::OpenOptions::new().read(true).write(true).open(e.path()).unwrap();
                let mut b = [0u8; 64];
                f.seek(SeekFrom::Start(2000)).unwrap();
                f.read_exact(&mut b).unwrap();
                b.iter_mut().for_each(|x| *x = !*x);
                f.seek(SeekFrom::Start(2000)).unwrap();
                f.write_all(&b).unwrap();
            }
        }
        let db = storage::open(dir.path()).unwrap();
        let mut s = whole_shard();
        let cmd = KvCommand {
            range_id: 1,
            epoch: 1,
            op: crate::command::KvOp::Put { key: "k".into(), value: "1".into(), if_version: Some(1) },
        };
        let mut b = ApplyBatch::default();
        // Before: the failed read became "key not found", so this replica
        // would refuse the CAS (version conflict) that the others apply.
        assert!(kv::apply(&db, GROUP, 2, &mut s, &mut b, &cmd).is_err(), "a storage error must stop the replica");
    }
}
