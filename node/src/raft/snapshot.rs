//! Snapshot files: a group's state machine streamed to disk from a RocksDB
//! snapshot, and streamed back into RocksDB on install.
//!
//! A snapshot is never held in memory as a whole. Building iterates a
//! consistent RocksDB snapshot and writes records to a file; sending streams
//! that file in chunks; receiving writes chunks to a file; installing reads
//! it back in bounded batches. File layout:
//!
//! ```text
//! "CLVSNAP1" | u32 len | bincode(SnapshotHeader) | { u32 klen | key | u32 vlen | value }* | u32::MAX
//! ```
//!
//! Installing is made crash-safe with a marker in `group_meta`: it is written
//! (and synced) before the group's old data is deleted and removed in the
//! batch that records the new applied log id. A node that restarts with the
//! marker present redoes the install from the file before opening the group.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use openraft::alias::{LogIdOf, SnapshotMetaOf, StoredMembershipOf};
use serde::{Deserialize, Serialize};

use super::incarnation::Incarnation;
use super::TypeConfig;
use crate::storage::{self, data_key, io_err, state_key, tag, Db, CF_DATA, CF_GROUP_META};

const MAGIC: &[u8; 8] = b"CLVSNAP1";
const END: u32 = u32::MAX;
/// Records per write batch when installing.
const INSTALL_BATCH_BYTES: usize = 4 << 20;

/// The data openraft passes around for a snapshot: a file on disk.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    pub path: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    meta: SnapshotMetaOf<TypeConfig>,
    /// The group's state-machine state (JSON), e.g. its owned ranges.
    sm_state: Vec<u8>,
}

fn bincode_encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    Ok(crate::codec::encode(v)?)
}

fn bincode_decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    Ok(crate::codec::decode(b)?)
}

fn write_frame(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    w.write_all(&(bytes.len() as u32).to_be_bytes())?;
    w.write_all(bytes)
}

/// Reads one length-prefixed frame; `None` at the end marker.
fn read_frame(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len == END {
        return Ok(None);
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(Some(buf))
}

/// Where one group's snapshot files live.
pub fn group_dir(root: &Path, group: u64) -> PathBuf {
    root.join(format!("g{group}"))
}

fn file_name(meta: &SnapshotMetaOf<TypeConfig>, unique: u64) -> String {
    let index = meta.last_log_id.as_ref().map_or(0, |l| l.index);
    format!("snap-{index:020}-{unique:016x}.snap")
}

/// Builds a snapshot of `group` from a consistent RocksDB snapshot.
/// The file becomes visible (renamed into place) only while `inc` lives: a
/// builder that outlives its replica leaves at most a `.tmp` file.
pub fn build(
    db: &Db,
    group: u64,
    root: &Path,
    inc: &Incarnation,
) -> io::Result<(SnapshotMetaOf<TypeConfig>, SnapshotFile)> {
    let snap = db.snapshot();
    let meta_cf = storage::cf(db, CF_GROUP_META);
    let last_log_id: Option<LogIdOf<TypeConfig>> = snap
        .get_cf(meta_cf, state_key(group, tag::APPLIED))
        .map_err(io_err)?
        .map(|b| bincode_decode(&b))
        .transpose()?;
    let last_membership: StoredMembershipOf<TypeConfig> = snap
        .get_cf(meta_cf, state_key(group, tag::MEMBERSHIP))
        .map_err(io_err)?
        .map(|b| bincode_decode(&b))
        .transpose()?
        .unwrap_or_default();
    let sm_state = snap.get_cf(meta_cf, state_key(group, tag::SM_STATE)).map_err(io_err)?.unwrap_or_default();
    let meta = SnapshotMetaOf::<TypeConfig> { last_log_id, last_membership };

    let dir = group_dir(root, group);
    fs::create_dir_all(&dir)?;
    let final_path = dir.join(file_name(&meta, rand::random()));
    let tmp = final_path.with_extension("tmp");
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    w.write_all(MAGIC)?;
    write_frame(&mut w, &bincode_encode(&SnapshotHeader { meta: meta.clone(), sm_state })?)?;
    let data_cf = storage::cf(db, CF_DATA);
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(storage::group_range_end(group));
    opts.set_snapshot(&snap);
    opts.fill_cache(false);
    let mut bytes = 0u64;
    for item in db.iterator_cf_opt(
        data_cf,
        opts,
        rocksdb::IteratorMode::From(&storage::group_prefix(group), rocksdb::Direction::Forward),
    ) {
        let (k, v) = item.map_err(io_err)?;
        write_frame(&mut w, storage::user_key_of(&k))?;
        write_frame(&mut w, &v)?;
        bytes += (k.len() + v.len()) as u64;
    }
    w.write_all(&END.to_be_bytes())?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    if let Err(e) = inc.write(|| fs::rename(&tmp, &final_path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    metrics::counter!("cleave_snapshots_built_total").increment(1);
    tracing::debug!(group, bytes, path = %final_path.display(), "snapshot built");
    prune(&dir, &final_path);
    Ok((meta, SnapshotFile { path: final_path }))
}

/// Removes older snapshot files of a group, keeping `keep`.
fn prune(dir: &Path, keep: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p != keep && p.extension().is_some_and(|x| x == "snap") && p < keep.to_path_buf() {
                let _ = fs::remove_file(p);
            }
        }
    }
}

/// Reads the header of a snapshot file.
pub fn read_meta(path: &Path) -> io::Result<SnapshotMetaOf<TypeConfig>> {
    let mut r = BufReader::new(File::open(path)?);
    Ok(read_header(&mut r)?.meta)
}

fn read_header(r: &mut impl Read) -> io::Result<SnapshotHeader> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a CleaveDB snapshot"));
    }
    let header = read_frame(r)?.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "snapshot without header"))?;
    bincode_decode(&header)
}

/// The newest complete snapshot of `group`, if any.
pub fn latest(root: &Path, group: u64) -> io::Result<Option<(SnapshotMetaOf<TypeConfig>, SnapshotFile)>> {
    let dir = group_dir(root, group);
    let Ok(entries) = fs::read_dir(&dir) else { return Ok(None) };
    let newest = entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "snap")).max();
    match newest {
        Some(path) => Ok(Some((read_meta(&path)?, SnapshotFile { path }))),
        None => Ok(None),
    }
}

/// A path for a snapshot being received for `group`.
pub fn receive_path(root: &Path, group: u64, transfer: u64) -> io::Result<PathBuf> {
    let dir = group_dir(root, group);
    fs::create_dir_all(&dir)?;
    Ok(dir.join(format!("recv-{transfer:016x}.part")))
}

/// Makes a fully received file durable. It becomes the group's current
/// snapshot only once installed ([`adopt`]).
pub fn finish_receive(part: &Path) -> io::Result<SnapshotFile> {
    File::open(part)?.sync_all()?;
    Ok(SnapshotFile { path: part.to_path_buf() })
}

/// After a received snapshot is installed: keep it as the group's current
/// snapshot (so it can be sent on) and drop older ones.
/// A snapshot file from elsewhere (not a transfer received here) is copied.
pub fn adopt(root: &Path, group: u64, file: &SnapshotFile) -> io::Result<()> {
    let dir = group_dir(root, group);
    let is_snap = file.path.extension().is_some_and(|x| x == "snap");
    if is_snap && file.path.parent() == Some(dir.as_path()) {
        return Ok(());
    }
    let meta = read_meta(&file.path)?;
    fs::create_dir_all(&dir)?;
    let path = dir.join(file_name(&meta, rand::random()));
    if is_snap {
        let tmp = path.with_extension("tmp");
        fs::copy(&file.path, &tmp)?;
        File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, &path)?;
    } else {
        fs::rename(&file.path, &path)?;
    }
    prune(&dir, &path);
    Ok(())
}

/// Removes partial transfers left by a crash or a broken connection.
pub fn remove_partial(root: &Path, group: u64) {
    if let Ok(entries) = fs::read_dir(group_dir(root, group)) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "part") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Replaces `group`'s state machine with the snapshot in `file`. Returns the
/// state-machine state it carried and the number of live keys. Crash-safe:
/// see the module doc. Every write checks `inc` first, so an install that
/// outlives its replica stops at its next batch.
pub fn install(db: &Db, group: u64, file: &SnapshotFile, inc: &Incarnation) -> io::Result<(Vec<u8>, (u64, u64))> {
    let meta_cf = storage::cf(db, CF_GROUP_META);
    let data_cf = storage::cf(db, CF_DATA);
    let marker = file.path.to_string_lossy().as_bytes().to_vec();
    let write = |batch: rocksdb::WriteBatch| inc.write(|| db.write(batch).map_err(io_err));
    inc.write(|| {
        db.put_cf(meta_cf, state_key(group, tag::INSTALLING), &marker).map_err(io_err)?;
        db.flush_wal(true).map_err(io_err)
    })?;

    let mut r = BufReader::with_capacity(1 << 20, File::open(&file.path)?);
    let header = read_header(&mut r)?;
    let mut batch = rocksdb::WriteBatch::default();
    batch.delete_range_cf(data_cf, storage::group_prefix(group).to_vec(), storage::group_range_end(group));
    let mut pending = 0usize;
    let (mut keys, mut bytes) = (0u64, 0u64);
    while let Some(key) = read_frame(&mut r)? {
        let value =
            read_frame(&mut r)?.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "truncated snapshot"))?;
        pending += key.len() + value.len();
        let user_key = key.first() != Some(&0xff);
        if let Some(v) = crate::storage::ValueRecord::decode(&value).filter(|v| user_key && !v.tombstone) {
            keys += 1;
            bytes += (key.len() + v.json.len()) as u64;
        }
        batch.put_cf(data_cf, data_key(group, &key), value);
        if pending >= INSTALL_BATCH_BYTES {
            write(std::mem::take(&mut batch))?;
            pending = 0;
        }
    }
    match &header.meta.last_log_id {
        Some(l) => batch.put_cf(meta_cf, state_key(group, tag::APPLIED), bincode_encode(l)?),
        None => batch.delete_cf(meta_cf, state_key(group, tag::APPLIED)),
    }
    batch.put_cf(meta_cf, state_key(group, tag::MEMBERSHIP), bincode_encode(&header.meta.last_membership)?);
    batch.put_cf(meta_cf, state_key(group, tag::SM_STATE), &header.sm_state);
    batch.put_cf(meta_cf, state_key(group, tag::KEYS), super::GroupStats::encode(keys, bytes));
    batch.delete_cf(meta_cf, state_key(group, tag::INSTALLING));
    write(batch)?;
    db.flush_wal(true).map_err(io_err)?;
    metrics::counter!("cleave_snapshots_installed_total").increment(1);
    Ok((header.sm_state, (keys, bytes)))
}

/// Finishes an install that a crash interrupted, if one was under way.
pub fn recover_install(db: &Db, root: &Path, group: u64) -> io::Result<()> {
    let meta_cf = storage::cf(db, CF_GROUP_META);
    if let Some(path) = db.get_cf(meta_cf, state_key(group, tag::INSTALLING)).map_err(io_err)? {
        let path = PathBuf::from(String::from_utf8_lossy(&path).into_owned());
        tracing::warn!(group, path = %path.display(), "redoing an interrupted snapshot install");
        let file = SnapshotFile { path };
        // Runs before the group opens: no other incarnation exists yet.
        install(db, group, &file, &Incarnation::default())?;
        adopt(root, group, &file)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_db;

    fn records(db: &Db, group: u64) -> usize {
        let cf = storage::cf(db, CF_DATA);
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(storage::group_range_end(group));
        let from = storage::group_prefix(group);
        db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward)).count()
    }

    #[test]
    fn a_snapshot_round_trips_through_build_and_install() {
        let (_d, db) = temp_db();
        let root = tempfile::tempdir().unwrap();
        let meta_cf = storage::cf(&db, CF_GROUP_META);
        db.put_cf(meta_cf, state_key(7, tag::SM_STATE), b"{\"state\":1}").unwrap();
        for k in ["a", "b", "c"] {
            let rec = storage::ValueRecord { version: 1, tombstone: false, json: b"1".to_vec() };
            db.put_cf(storage::cf(&db, CF_DATA), data_key(7, k.as_bytes()), rec.encode()).unwrap();
        }
        let live = Incarnation::default();
        let (_, file) = build(&db, 7, root.path(), &live).unwrap();
        let (_d2, other) = temp_db();
        let (sm_state, (keys, _)) = install(&other, 7, &file, &live).unwrap();
        assert_eq!(sm_state, b"{\"state\":1}");
        assert_eq!((keys, records(&other, 7)), (3, 3));
        assert!(other.get_cf(storage::cf(&other, CF_GROUP_META), state_key(7, tag::INSTALLING)).unwrap().is_none());
    }

    #[test]
    fn an_ended_incarnation_neither_installs_nor_publishes_a_snapshot() {
        let (_d, db) = temp_db();
        let root = tempfile::tempdir().unwrap();
        let meta_cf = storage::cf(&db, CF_GROUP_META);
        let rec = storage::ValueRecord { version: 1, tombstone: false, json: b"1".to_vec() };
        db.put_cf(storage::cf(&db, CF_DATA), data_key(7, b"old"), rec.encode()).unwrap();
        db.put_cf(meta_cf, state_key(7, tag::SM_STATE), b"old").unwrap();
        let (_, file) = build(&db, 7, root.path(), &Incarnation::default()).unwrap();
        // The replica is destroyed and a new one of the same group created;
        // the old incarnation's worker then tries to install and to build.
        db.delete_range_cf(storage::cf(&db, CF_DATA), storage::group_prefix(7).to_vec(), storage::group_range_end(7))
            .unwrap();
        db.put_cf(meta_cf, state_key(7, tag::SM_STATE), b"new").unwrap();
        let old = Incarnation::default();
        old.end();
        assert!(install(&db, 7, &file, &old).is_err());
        assert_eq!(records(&db, 7), 0, "no deleted key came back");
        assert_eq!(db.get_cf(meta_cf, state_key(7, tag::SM_STATE)).unwrap().as_deref(), Some(&b"new"[..]));
        assert!(db.get_cf(meta_cf, state_key(7, tag::INSTALLING)).unwrap().is_none(), "no install marker left");
        let root2 = tempfile::tempdir().unwrap();
        assert!(build(&db, 7, root2.path(), &old).is_err());
        assert!(latest(root2.path(), 7).unwrap().is_none(), "no snapshot file published");
    }
}
