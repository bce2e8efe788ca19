//! How the metadata group stores its directory: a small header and one
//! record per shard, range and operation — not one document.
//!
//! The directory grows with the cluster: with 10,000 shards it is several
//! MB of JSON. Written whole with every change the metadata group applies
//! (a split alone makes several), it filled the node's memtables and cost
//! milliseconds of CPU per entry, so making shards got slower the more
//! there were. Here the state-machine state (`tag::SM_STATE`) holds only
//! the directory's *header* — version, id counters, nodes, the metadata
//! group's own replicas — and each shard, range and operation is a record
//! in the group's `data` family under an internal key
//! (`0xff 'd' kind id`). An apply writes the header and only the records
//! that changed ([`write_changes`]).
//!
//! Snapshots copy a group's `data` family as it is, so building, sending
//! and installing a snapshot of the metadata group needs nothing special;
//! reading the state back ([`load`]) joins header and records. A header
//! that still holds records of its own (a node written before this layout,
//! or a state passed to `GroupRaft::create`) is the whole directory:
//! [`load`] takes it as it is and [`write_all`] stores it in this layout.

use std::collections::BTreeMap;
use std::io;

use cleave_metadata::Directory;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::storage::{self, data_key, io_err, Db, CF_DATA};

/// The first bytes of every directory record's key (after the group).
const PREFIX: [u8; 2] = [0xff, b'd'];
const SHARD: u8 = b's';
const RANGE: u8 = b'r';
const OP: u8 = b'o';

fn record_key(group: u64, kind: u8, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + id.len());
    k.extend_from_slice(&PREFIX);
    k.push(kind);
    k.extend_from_slice(id);
    data_key(group, &k)
}

/// The directory without its shards, ranges and operations.
pub fn header(d: &Directory) -> Directory {
    Directory {
        version: d.version,
        nodes: d.nodes.clone(),
        meta: d.meta.clone(),
        shards: BTreeMap::new(),
        ranges: BTreeMap::new(),
        next_node_id: d.next_node_id,
        next_shard_id: d.next_shard_id,
        next_range_id: d.next_range_id,
        next_replica_id: d.next_replica_id,
        ops: BTreeMap::new(),
        next_op_id: d.next_op_id,
        // Few and small: kept in the header.
        keyspaces: d.keyspaces.clone(),
    }
}

/// Whether `d` holds records of its own (see the module).
fn is_whole(d: &Directory) -> bool {
    !(d.shards.is_empty() && d.ranges.is_empty() && d.ops.is_empty())
}

/// Adds to `batch` the records that differ between `before` and `after`.
/// The caller writes the header.
pub fn write_changes(
    db: &Db,
    batch: &mut rocksdb::WriteBatch,
    group: u64,
    before: &Directory,
    after: &Directory,
) -> io::Result<()> {
    let cf = storage::cf(db, CF_DATA);
    diff(batch, cf, group, SHARD, &before.shards, &after.shards, |id| id.to_be_bytes().to_vec())?;
    diff(batch, cf, group, RANGE, &before.ranges, &after.ranges, |start| start.as_bytes().to_vec())?;
    diff(batch, cf, group, OP, &before.ops, &after.ops, |id| id.to_be_bytes().to_vec())
}

/// Adds to `batch` every record of `d` after deleting the group's old ones.
/// The caller writes the header.
pub fn write_all(db: &Db, batch: &mut rocksdb::WriteBatch, group: u64, d: &Directory) -> io::Result<()> {
    let cf = storage::cf(db, CF_DATA);
    batch.delete_range_cf(cf, data_key(group, &PREFIX), data_key(group, &[PREFIX[0], PREFIX[1] + 1]));
    write_changes(db, batch, group, &Directory::default(), d)
}

fn diff<K: Ord, V: PartialEq + Serialize>(
    batch: &mut rocksdb::WriteBatch,
    cf: &rocksdb::ColumnFamily,
    group: u64,
    kind: u8,
    before: &BTreeMap<K, V>,
    after: &BTreeMap<K, V>,
    id: impl Fn(&K) -> Vec<u8>,
) -> io::Result<()> {
    for k in before.keys().filter(|k| !after.contains_key(k)) {
        batch.delete_cf(cf, record_key(group, kind, &id(k)));
    }
    for (k, v) in after {
        if before.get(k) != Some(v) {
            batch.put_cf(cf, record_key(group, kind, &id(k)), serde_json::to_vec(v).map_err(io_err)?);
        }
    }
    Ok(())
}

/// The directory of `group` stored in the form of before this layout
/// (`d`, tagged `Meta`): a directory that holds records of its own is
/// whole, and is rewritten in this layout first (one batch), so that the
/// changes applied to it from now on, written record by record, add up to
/// it; one without any is a header the first version of this layout wrote
/// under the old tag.
pub fn load_or_migrate(db: &Db, group: u64, d: Directory) -> io::Result<Directory> {
    if !is_whole(&d) {
        return load(db, group, d);
    }
    let mut batch = rocksdb::WriteBatch::default();
    write_all(db, &mut batch, group, &d)?;
    let stored = super::SmState::Meta(d.clone()).stored_json()?;
    batch.put_cf(storage::cf(db, storage::CF_GROUP_META), storage::state_key(group, storage::tag::SM_STATE), stored);
    db.write(batch).map_err(io_err)?;
    Ok(d)
}

/// The directory stored for `group` with header `h`, read from its records.
pub fn load(db: &Db, group: u64, mut h: Directory) -> io::Result<Directory> {
    h.shards = read_kind(db, group, SHARD, |id| id.try_into().ok().map(u64::from_be_bytes))?;
    h.ranges = read_kind(db, group, RANGE, |id| String::from_utf8(id.to_vec()).ok())?;
    h.ops = read_kind(db, group, OP, |id| id.try_into().ok().map(u64::from_be_bytes))?;
    Ok(h)
}

fn read_kind<K: Ord, V: DeserializeOwned>(
    db: &Db,
    group: u64,
    kind: u8,
    id: impl Fn(&[u8]) -> Option<K>,
) -> io::Result<BTreeMap<K, V>> {
    let from = record_key(group, kind, &[]);
    let mut upper = from.clone();
    *upper.last_mut().expect("kind") += 1;
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(upper);
    let cf = storage::cf(db, CF_DATA);
    let mut out = BTreeMap::new();
    for item in db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward)) {
        let (k, v) = item.map_err(io_err)?;
        let key = id(&k[from.len()..])
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad directory record key {k:?}")))?;
        out.insert(key, serde_json::from_slice(&v).map_err(io_err)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_db;
    use cleave_metadata::{MetaCommand, MetaResponse, Phase};

    /// Writes what an apply of `cmd` to `d` changes, as the state machine
    /// does; answers the number of records written.
    fn apply(db: &Db, d: &mut Directory, cmd: MetaCommand) -> usize {
        let before = d.clone();
        d.apply(&cmd).unwrap();
        let mut b = rocksdb::WriteBatch::default();
        write_changes(db, &mut b, 0, &before, d).unwrap();
        let n = b.len();
        db.write(b).unwrap();
        n
    }

    fn stored(db: &Db, d: &Directory) -> Directory {
        load(db, 0, header(d)).unwrap()
    }

    #[test]
    fn a_directory_round_trips_through_its_records_and_a_change_writes_only_what_changed() {
        let (_dir, db) = temp_db();
        let mut d = Directory::bootstrap(&[(1, "a:1".into()), (2, "a:2".into()), (3, "a:3".into())], 3);
        let mut b = rocksdb::WriteBatch::default();
        write_all(&db, &mut b, 0, &d).unwrap();
        db.write(b).unwrap();
        assert_eq!(stored(&db, &d), d);
        // A neighbouring group's records are not this group's.
        let mut b = rocksdb::WriteBatch::default();
        write_all(&db, &mut b, 1, &Directory::bootstrap(&[(9, "z:9".into())], 1)).unwrap();
        db.write(b).unwrap();
        assert_eq!(stored(&db, &d), d);

        // A split, step by step: each step writes the few records it changes.
        let plan = crate::testing::plan_split("m");
        let before = d.clone();
        let Ok(MetaResponse::Op(op)) = before.clone().apply(&plan) else { panic!("planned") };
        assert!(apply(&db, &mut d, plan) <= 3, "the operation, the new shard, the busy range");
        for (from, to) in
            [(Phase::Planned, Phase::Created), (Phase::Created, Phase::Capturing), (Phase::Capturing, Phase::Frozen)]
        {
            assert_eq!(
                apply(&db, &mut d, MetaCommand::AdvanceOp { op_id: op, from, to, now_ms: 2 }),
                1,
                "the operation"
            );
        }
        assert!(apply(&db, &mut d, MetaCommand::CommitSplit { op_id: op, now_ms: 3 }) <= 4);
        assert_eq!(d.ranges.len(), 2);
        assert_eq!(stored(&db, &d), d, "what is stored is the directory");

        // A record gone from the directory is gone from storage.
        let before = d.clone();
        d.ops.clear();
        let mut b = rocksdb::WriteBatch::default();
        write_changes(&db, &mut b, 0, &before, &d).unwrap();
        db.write(b).unwrap();
        assert_eq!(stored(&db, &d), d);
        // ... and rewriting it whole drops records it no longer has.
        let mut b = rocksdb::WriteBatch::default();
        write_all(&db, &mut b, 0, &before).unwrap();
        db.write(b).unwrap();
        assert_eq!(stored(&db, &before), before);
        let mut b = rocksdb::WriteBatch::default();
        write_all(&db, &mut b, 0, &d).unwrap();
        db.write(b).unwrap();
        assert_eq!(stored(&db, &d), d);
    }

    #[test]
    fn a_whole_directory_in_the_header_is_rewritten_record_by_record() {
        let (_dir, db) = temp_db();
        let d = Directory::bootstrap(&[(1, "a:1".into()), (2, "a:2".into())], 2);
        assert!(is_whole(&d) && !is_whole(&header(&d)));
        // As a node written before this layout stored it, or `create` does.
        let cf = storage::cf(&db, storage::CF_GROUP_META);
        let key = storage::state_key(0, storage::tag::SM_STATE);
        let old = super::super::SmState::Meta(d.clone()).to_json().unwrap();
        db.put_cf(cf, key, &old).unwrap();
        assert_eq!(super::super::SmState::read(&db, 0, &old).unwrap(), super::super::SmState::Meta(d.clone()));
        let raw = db.get_cf(cf, key).unwrap().unwrap();
        let h = super::super::stored_header(&raw).expect("a tagged header");
        assert_eq!(h, header(&d), "the header alone is stored now");
        assert_eq!(load(&db, 0, h.clone()).unwrap(), d, "and the records hold the rest");
        // A header the first version of this layout stored under the old
        // tag is read as a header, not taken for an empty directory.
        let untagged = super::super::SmState::Meta(h).to_json().unwrap();
        assert_eq!(super::super::SmState::read(&db, 0, &untagged).unwrap(), super::super::SmState::Meta(d.clone()));
        // A binary from before this layout cannot read the header: it stops
        // instead of serving a directory without shards.
        assert!(serde_json::from_slice::<super::super::SmState>(&raw).is_err());
    }
}
