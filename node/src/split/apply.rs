//! How a shard applies the split steps of [`ShardCommand`]: captures and
//! freezes on the source, ingest and activation on the target.
//!
//! Everything here runs inside the state machine's apply, under the same
//! write batch as the rest of the entry batch, so a step and its data
//! changes are atomic. Every step is idempotent: a driver that resumes after
//! a crash may send it again.

use crate::command::ShardCommand;
use crate::kv::{self, ApplyBatch, Capture, ShardState, StatsDelta};
use crate::split::digest;
use crate::storage::{self, data_key, Db, ValueRecord};

/// Deletes the forward log of operation `op`.
fn drop_forward_log(db: &Db, group: u64, op: u64, batch: &mut rocksdb::WriteBatch) {
    let cf = storage::cf(db, storage::CF_DATA);
    batch.delete_range_cf(cf, kv::forward_key(group, op, 0), kv::forward_key(group, op.wrapping_add(1), 0));
}

/// Applies one split step at log `index`. Returns the answer (`Freeze`: the
/// freeze index; others: the entry index).
pub fn apply(
    db: &Db,
    group: u64,
    index: u64,
    state: &mut ShardState,
    b: &mut ApplyBatch,
    cmd: &ShardCommand,
) -> Result<u64, String> {
    b.changed = true;
    let ApplyBatch { write: batch, overlay, stats, .. } = b;
    match cmd {
        ShardCommand::BeginCapture { op_id, start, end, target } => {
            if state.captures.iter().any(|c| c.op_id == *op_id) {
                return Ok(index);
            }
            let covered = state.owner(start).is_some_and(|r| match (&r.end, end) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(re), Some(e)) => e <= re,
            });
            if !covered {
                return Err(format!("range [{start:?}, {end:?}) is not owned by shard {group}"));
            }
            state.captures.push(Capture {
                op_id: *op_id,
                start: start.clone(),
                end: end.clone(),
                target: *target,
                frozen_at: None,
            });
            Ok(index)
        }
        ShardCommand::Freeze { op_id } => {
            let c =
                state.captures.iter_mut().find(|c| c.op_id == *op_id).ok_or(format!("no capture for op {op_id}"))?;
            Ok(*c.frozen_at.get_or_insert(index))
        }
        ShardCommand::EndCapture { op_id } => {
            state.captures.retain(|c| c.op_id != *op_id);
            drop_forward_log(db, group, *op_id, batch);
            Ok(index)
        }
        ShardCommand::SplitDone { op_id, left, moved, moved_keys, moved_bytes } => {
            if state.moved.iter().any(|m| m.range_id == moved.range_id && m.epoch == moved.epoch) {
                return Ok(index);
            }
            let cf = storage::cf(db, storage::CF_DATA);
            let end = match &moved.end {
                Some(e) => data_key(group, e.as_bytes()),
                None => kv::user_data_end(group),
            };
            batch.delete_range_cf(cf, data_key(group, moved.start.as_bytes()), end);
            overlay.retain(|k, _| !moved.contains(k));
            drop_forward_log(db, group, *op_id, batch);
            state.captures.retain(|c| c.op_id != *op_id);
            state.ranges.retain(|r| r.range_id != left.range_id);
            state.ranges.push(left.clone());
            state.ranges.sort_by(|a, b| a.start.cmp(&b.start));
            state.moved.retain(|m| m.range_id != moved.range_id);
            state.moved.push(moved.clone());
            stats.add(StatsDelta { keys: -(*moved_keys as i64), bytes: -(*moved_bytes as i64) });
            Ok(index)
        }
        ShardCommand::Ingest { op_id, source_index, records } => {
            let inc = match &mut state.incoming {
                Some(inc) if inc.op_id == *op_id => inc,
                _ if state.ranges.iter().any(|_| true) => return Ok(index), // already activated: late redelivery
                _ => return Err(format!("shard {group} is not receiving op {op_id}")),
            };
            if source_index.is_some_and(|i| i <= inc.watermark) {
                return Ok(index);
            }
            let cf = storage::cf(db, storage::CF_DATA);
            for (key, bytes) in records {
                let inside = key.as_str() >= inc.start.as_str() && inc.end.as_deref().is_none_or(|e| key.as_str() < e);
                let Some(new) = ValueRecord::decode(bytes) else { continue };
                if !inside {
                    continue;
                }
                let cur = kv::current(db, group, overlay, key).map_err(|e| e.to_string())?;
                if cur.as_ref().is_some_and(|c| c.version >= new.version) {
                    continue;
                }
                inc.digest = inc.digest.wrapping_add(digest::delta(key, cur.as_ref(), &new));
                stats.add(StatsDelta::replace(key, cur.as_ref(), &new));
                batch.put_cf(cf, data_key(group, key.as_bytes()), bytes);
                overlay.insert(key.clone(), new);
            }
            if let Some(i) = source_index {
                inc.watermark = *i;
            }
            Ok(index)
        }
        ShardCommand::BackfillDone { op_id, snapshot_index, digest, keys, bytes } => {
            if let Some(inc) = state.incoming.as_mut().filter(|i| i.op_id == *op_id) {
                inc.backfill = Some((*snapshot_index, *digest));
                inc.backfill_copied = (*keys, *bytes);
            }
            Ok(index)
        }
        ShardCommand::Activate { op_id, ranges } => {
            match &state.incoming {
                Some(inc) if inc.op_id == *op_id => {
                    state.ranges = ranges.clone();
                    state.incoming = None;
                }
                _ if !state.ranges.is_empty() => {}
                _ => return Err(format!("shard {group} is not receiving op {op_id}")),
            }
            Ok(index)
        }
    }
}
