//! The node's single RocksDB, shared by every Raft group the node hosts.
//!
//! One database per node (not per group) keeps the number of open files,
//! memtables and WAL fsyncs independent of how many shards a node carries.
//! Groups are kept apart by prefixing every key with the group id (8 bytes,
//! big-endian, so a group's keys are contiguous and ordered). Four column
//! families separate data with different access patterns:
//!
//! | column family | key | value |
//! |---|---|---|
//! | `raft_log`   | group · index            | a bincode log entry |
//! | `raft_state` | group · tag              | vote, committed, last purged |
//! | `data`       | group · user key         | [`ValueRecord`]: version, tombstone flag, JSON, a transaction's lock or outcomes |
//! | `group_meta` | group · tag              | applied log id, membership, state-machine state, descriptor, install marker, key/byte counts, genesis state, tombstone |
//!
//! Writes never fsync on their own: durability comes from the [`Syncer`],
//! which batches WAL syncs across all groups (group commit).

mod keys;
mod syncer;
pub mod txn_info;
mod value;

use std::path::Path;
use std::sync::Arc;

pub use keys::{data_key, group_prefix, group_range_end, log_key, state_key, user_key_of};
pub use syncer::Syncer;
pub use value::ValueRecord;

/// The database type used everywhere in the node.
pub type Db = rocksdb::DB;

pub const CF_RAFT_LOG: &str = "raft_log";
pub const CF_RAFT_STATE: &str = "raft_state";
pub const CF_DATA: &str = "data";
pub const CF_GROUP_META: &str = "group_meta";

/// Tags in `raft_state`.
pub mod tag {
    pub const VOTE: u8 = 1;
    pub const COMMITTED: u8 = 2;
    pub const PURGED: u8 = 3;
    /// Tags in `group_meta`.
    pub const APPLIED: u8 = 1;
    pub const MEMBERSHIP: u8 = 2;
    pub const SM_STATE: u8 = 3;
    pub const DESCRIPTOR: u8 = 4;
    pub const INSTALLING: u8 = 5;
    /// Number of live keys of a shard.
    pub const KEYS: u8 = 6;
    /// The state machine's state when the group was created, before any
    /// entry: what a replica added later starts from before it replays the
    /// log (or installs a snapshot).
    pub const GENESIS: u8 = 7;
    /// The newest replica id of the group deleted from this node (kept after
    /// the group's other records are gone): a request to create that replica
    /// or an older one is stale and refused.
    pub const TOMBSTONE: u8 = 8;
    /// A split target's finished mirror copy (`split::mirror`): what the
    /// copy and the mirrored writes left in its keys, until it activates.
    pub const MIRROR: u8 = 9;
}

/// Opens (or creates) the node's database under `dir`.
pub fn open(dir: &Path) -> Result<Arc<Db>, rocksdb::Error> {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.increase_parallelism(2);
    // Many small groups: keep memtables shared and WAL-based durability.
    opts.set_max_total_wal_size(256 << 20);
    opts.set_keep_log_file_num(4);
    let mut log_opts = rocksdb::Options::default();
    log_opts.set_write_buffer_size(32 << 20);
    let cfs = vec![
        rocksdb::ColumnFamilyDescriptor::new(CF_RAFT_LOG, log_opts),
        rocksdb::ColumnFamilyDescriptor::new(CF_RAFT_STATE, rocksdb::Options::default()),
        rocksdb::ColumnFamilyDescriptor::new(CF_DATA, data_cf_options()),
        rocksdb::ColumnFamilyDescriptor::new(CF_GROUP_META, rocksdb::Options::default()),
    ];
    let db = Db::open_cf_descriptors(&opts, dir, cfs)?;
    // A table file moved down to the last level as it was flushed keeps its
    // sequence numbers, and RocksDB rewrites it whole — only to zero them —
    // as soon as any snapshot is released ("BottommostFiles" compactions,
    // rocksdb#11701). Ours are released all the time (a Raft snapshot's
    // build, a split's backfill): each released one had every node rewrite
    // its newest 64 MiB data files during the split, a third of their CPU.
    // Such a file now waits ten minutes; ordinary compactions often take it
    // first. (What it holds that a snapshot protected stays that long.)
    db.set_options_cf(cf(&db, CF_DATA), &[("bottommost_file_compaction_delay", BOTTOMMOST_DELAY_S)])?;
    Ok(Arc::new(db))
}

/// Seconds a last-level table file waits before it may be rewritten only to
/// drop what a released snapshot protected (see [`open`]).
const BOTTOMMOST_DELAY_S: &str = "600";

/// Options of the `data` family; table files made outside the database
/// for it (a split's backfill, `split::sst`) are written with them too.
pub fn data_cf_options() -> rocksdb::Options {
    let mut data_opts = rocksdb::Options::default();
    data_opts.set_write_buffer_size(64 << 20);
    data_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    data_opts
}

/// A column family handle by name. The four families always exist once
/// [`open`] succeeded, so a missing one is a programming error.
pub fn cf<'a>(db: &'a Db, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).unwrap_or_else(|| panic!("column family {name} missing"))
}

/// Reads and decodes (bincode, see [`crate::codec`]) the value at `key` of
/// column family `name`.
pub fn get_decoded<T: serde::de::DeserializeOwned>(db: &Db, name: &str, key: &[u8]) -> std::io::Result<Option<T>> {
    match db.get_pinned_cf(cf(db, name), key).map_err(io_err)? {
        Some(b) => Ok(Some(crate::codec::decode(&b)?)),
        None => Ok(None),
    }
}

/// Converts a RocksDB error into the `io::Error` openraft's traits expect.
pub fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Decodes the stored record of user key `key`. Bytes that are not a
/// record (corruption, or a format this build does not know) are a storage
/// error — they stop whatever reads them — never an absent key: a lock or
/// an outcome silently dropped would break a transaction.
pub fn decode_record(key: &[u8], bytes: &[u8]) -> std::io::Result<ValueRecord> {
    ValueRecord::decode(bytes).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the stored record of key {:?} is undecodable", String::from_utf8_lossy(key)),
        )
    })
}

/// Every column family, for deleting a whole group in one batch.
pub const ALL_CFS: [&str; 4] = [CF_RAFT_LOG, CF_RAFT_STATE, CF_DATA, CF_GROUP_META];

/// Approximate on-disk size of the database (SST files + memtables).
pub fn approximate_size(db: &Db) -> u64 {
    ALL_CFS
        .iter()
        .map(|name| {
            let cf = cf(db, name);
            db.property_int_value_cf(cf, "rocksdb.total-sst-files-size").ok().flatten().unwrap_or(0)
                + db.property_int_value_cf(cf, "rocksdb.cur-size-all-mem-tables").ok().flatten().unwrap_or(0)
        })
        .sum()
}

/// Bytes RocksDB holds in memory, summed over the column families: its
/// memtables, its open tables' indexes and filters, and its block cache.
pub fn memory_bytes(db: &Db) -> MemoryUse {
    let sum = |prop: &str| -> u64 {
        ALL_CFS.iter().map(|name| db.property_int_value_cf(cf(db, name), prop).ok().flatten().unwrap_or(0)).sum()
    };
    MemoryUse {
        memtables: sum("rocksdb.cur-size-all-mem-tables"),
        table_readers: sum("rocksdb.estimate-table-readers-mem"),
        block_cache: db.property_int_value("rocksdb.block-cache-usage").ok().flatten().unwrap_or(0),
    }
}

/// See [`memory_bytes`].
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryUse {
    pub memtables: u64,
    pub table_readers: u64,
    pub block_cache: u64,
}
