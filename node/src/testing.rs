//! Helpers for the node crate's in-process tests: a temporary RocksDB, and
//! applying KV commands and split steps to a shard's state the way the state
//! machine does (one write batch per call).

use std::sync::Arc;

use cleave_metadata::RangeDescriptor;

use crate::command::{KvCommand, KvError, KvOp, ShardCommand, StepError};
use crate::kv::{self, ApplyBatch, ShardState};
use crate::storage::{self, Db};

/// A fresh database in a temporary folder (kept alive by the `TempDir`).
pub fn temp_db() -> (tempfile::TempDir, Arc<Db>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = storage::open(dir.path()).expect("open rocksdb");
    (dir, db)
}

/// A node's shared Raft context over a fresh database (needs a Tokio
/// runtime: it starts the WAL syncer).
pub fn temp_ctx() -> (tempfile::TempDir, crate::raft::RaftContext) {
    let (dir, db) = temp_db();
    let ctx = crate::raft::RaftContext {
        addresses: crate::raft::AddressBook::default(),
        syncer: storage::Syncer::start(db.clone()),
        db,
        transport: crate::rpc::Transport::new(),
        snapshot_root: dir.path().join("snapshots"),
        settings: crate::raft::RaftSettings {
            heartbeat_ms: 100,
            election_timeout_ms: 1000,
            snapshot_logs: 1000,
            keep_logs: 100,
            dormant_after_ms: 0,
        },
        awake: Default::default(),
        mirrors: Default::default(),
        clock: Default::default(),
    };
    (dir, ctx)
}

pub fn range(range_id: u64, start: &str, end: Option<&str>, epoch: u64) -> RangeDescriptor {
    RangeDescriptor {
        range_id,
        start: start.into(),
        end: end.map(Into::into),
        shard_id: 1,
        epoch,
        state: Default::default(),
    }
}

/// A shard of group `GROUP` owning the whole key space as range 1 at epoch 1.
pub fn whole_shard() -> ShardState {
    ShardState { ranges: vec![range(1, "", None, 1)], ..Default::default() }
}

pub const GROUP: u64 = 1;

/// The metadata command planning a split of range 1 at `key` onto nodes 1–3.
pub fn plan_split(key: &str) -> cleave_metadata::MetaCommand {
    cleave_metadata::MetaCommand::PlanSplit {
        range_id: 1,
        split_key: key.into(),
        target_nodes: vec![1, 2, 3],
        reason: "test".into(),
        now_ms: 1,
    }
}

/// Applies a put of `key` (range 1, epoch 1) at `index` and writes the batch.
pub fn put(db: &Db, state: &mut ShardState, index: u64, key: &str, json: &str) -> Result<u64, KvError> {
    let cmd =
        KvCommand { range_id: 1, epoch: 1, op: KvOp::Put { key: key.into(), value: json.into(), if_version: None } };
    let mut b = ApplyBatch { ts: state.next_ts(0), ..ApplyBatch::default() };
    let r = kv::apply(db, GROUP, index, state, &mut b, &cmd).expect("storage");
    db.write(b.write).expect("write");
    r
}

/// A starting state for [`noise`].
pub const NOISE_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// `len` pseudo-random lowercase letters (xorshift from `state`, which
/// moves on): an incompressible value, so table files fill as real data
/// would.
pub fn noise(state: &mut u64, len: usize) -> String {
    (0..len)
        .map(|_| {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            char::from(b'a' + (*state % 26) as u8)
        })
        .collect()
}

/// A split source: shard `GROUP` with `n` keys of 500 random letters spread over
/// the alphabet, capturing `[m, ∞)` for operation `op` into `target`, its
/// state stored as the apply would.
pub fn split_source(n: usize, op: u64, target: u64) -> (tempfile::TempDir, Arc<Db>) {
    let (dir, db) = temp_db();
    let mut s = whole_shard();
    // Incompressible values, so that files fill by size as they would.
    let mut x = NOISE_SEED;
    for i in 0..n {
        let key = format!("{}{i:04}", (b'a' + (i % 26) as u8) as char);
        put(&db, &mut s, i as u64 + 1, &key, &format!("\"{}\"", noise(&mut x, 500))).unwrap();
    }
    s.captures.push(kv::Capture::new(op, "m".into(), None, target, false));
    let meta = storage::cf(&db, storage::CF_GROUP_META);
    let state = crate::raft::SmState::Shard(s).to_json().unwrap();
    db.put_cf(meta, storage::state_key(GROUP, storage::tag::SM_STATE), state).unwrap();
    (dir, db)
}

/// Applies a split step at `index` and writes the batch.
pub fn step(db: &Db, state: &mut ShardState, index: u64, cmd: ShardCommand) -> Result<u64, StepError> {
    let mut b = ApplyBatch::default();
    let r = crate::split::apply::apply(db, GROUP, index, state, &mut b, &cmd).expect("storage");
    db.write(b.write).expect("write");
    r
}

/// Source log indexes of the forward-log entries of operation `op`.
pub fn forward_indexes(db: &Db, op: u64) -> Vec<u64> {
    let cf = storage::cf(db, storage::CF_DATA);
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(kv::forward_key(GROUP, op + 1, 0));
    let from = kv::forward_key(GROUP, op, 0);
    db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward))
        .map(|i| {
            let (k, _) = i.expect("read");
            u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes"))
        })
        .collect()
}

/// Every `data` record of `group`, user keys and internal ones, in order.
pub fn group_data(db: &Db, group: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let cf = storage::cf(db, storage::CF_DATA);
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(storage::group_range_end(group));
    let from = storage::group_prefix(group);
    db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward))
        .map(|i| {
            let (k, v) = i.expect("read");
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

/// The `group_meta` record `tag` of `group`.
pub fn group_meta(db: &Db, group: u64, tag: u8) -> Option<Vec<u8>> {
    db.get_cf(storage::cf(db, storage::CF_GROUP_META), storage::state_key(group, tag)).expect("read")
}

/// A committed log id of `term` (leader 1) at `index`.
pub fn log_id(term: u64, index: u64) -> openraft::alias::LogIdOf<crate::raft::TypeConfig> {
    openraft::testing::log_id::<crate::raft::TypeConfig>(term, 1, index)
}
