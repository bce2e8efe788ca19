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
#[cfg(not(test))]
const INSTALL_BATCH_BYTES: usize = 4 << 20;
/// Small in tests, so that a small snapshot installs in several batches.
#[cfg(test)]
const INSTALL_BATCH_BYTES: usize = 4 << 10;

/// Test seam: a crash in the middle of an install on this thread.
#[cfg(test)]
pub(crate) mod crash {
    use std::cell::Cell;

    thread_local! {
        static BATCHES_LEFT: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// The next install on this thread writes `batches` write batches after
    /// its marker, then stops as if the process had died.
    pub fn after_batches(batches: usize) {
        BATCHES_LEFT.with(|b| b.set(Some(batches)));
    }

    /// Called before each install batch: fails once the budget is spent.
    pub(super) fn before_batch() -> std::io::Result<()> {
        BATCHES_LEFT.with(|b| match b.get() {
            Some(0) => {
                b.set(None);
                Err(std::io::Error::other("simulated crash"))
            }
            left => {
                b.set(left.map(|n| n - 1));
                Ok(())
            }
        })
    }
}

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
    let write = |batch: rocksdb::WriteBatch| {
        #[cfg(test)]
        crash::before_batch()?;
        inc.write(|| db.write(batch).map_err(io_err))
    };
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

/// Finishes an install that a crash (or the end of the instance running
/// it) interrupted, if one was under way; answers whether there was one.
pub fn recover_install(db: &Db, root: &Path, group: u64) -> io::Result<bool> {
    let meta_cf = storage::cf(db, CF_GROUP_META);
    if let Some(path) = db.get_cf(meta_cf, state_key(group, tag::INSTALLING)).map_err(io_err)? {
        let path = PathBuf::from(String::from_utf8_lossy(&path).into_owned());
        tracing::warn!(group, path = %path.display(), "redoing an interrupted snapshot install");
        let file = SnapshotFile { path };
        // Runs before the group's instance starts: no other incarnation runs.
        install(db, group, &file, &Incarnation::default())?;
        adopt(root, group, &file)?;
        return Ok(true);
    }
    Ok(false)
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
            let rec = storage::ValueRecord::live(1, b"1".to_vec());
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
        let rec = storage::ValueRecord::live(1, b"1".to_vec());
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

    use crate::storage::ValueRecord;
    use crate::testing::{group_data, group_meta, log_id};

    /// Fills `group` as a state machine leaves it: 300 user records, every
    /// tenth a tombstone, a forward-log record, the applied log id at
    /// `applied`, a membership and a state. Returns the live keys and bytes.
    fn fill(db: &Db, group: u64, applied: u64) -> (u64, u64) {
        let data = storage::cf(db, CF_DATA);
        let mut live = (0, 0);
        for i in 0..300u64 {
            let key = format!("key{i:04}");
            let rec = match i % 10 {
                0 => ValueRecord::deleted(2),
                _ => {
                    let json = format!("\"value {i} as of {applied}, padded to span several install batches\"");
                    ValueRecord::live(1, json.into())
                }
            };
            if !rec.tombstone {
                live = (live.0 + 1, live.1 + (key.len() + rec.json.len()) as u64);
            }
            db.put_cf(data, data_key(group, key.as_bytes()), rec.encode()).unwrap();
        }
        db.put_cf(data, crate::kv::forward_key(group, 5, 42), b"a forwarded write").unwrap();
        let meta = storage::cf(db, CF_GROUP_META);
        db.put_cf(meta, state_key(group, tag::APPLIED), bincode_encode(&log_id(2, applied)).unwrap()).unwrap();
        let voters = openraft::Membership::new_with_defaults(vec![[1, 2, 3].into()], []);
        let membership = StoredMembershipOf::<TypeConfig>::new(Some(log_id(1, 1)), voters);
        db.put_cf(meta, state_key(group, tag::MEMBERSHIP), bincode_encode(&membership).unwrap()).unwrap();
        db.put_cf(meta, state_key(group, tag::SM_STATE), format!("{{\"applied\":{applied}}}")).unwrap();
        live
    }

    /// What a replica of `group` held before a snapshot replaces it: keys
    /// the snapshot does not have, one it has with another value, an older
    /// applied id and state.
    fn fill_old(db: &Db, group: u64) {
        let data = storage::cf(db, CF_DATA);
        for key in ["key0001", "old1", "old2", "zzz"] {
            let rec = ValueRecord::live(9, b"\"old\"".to_vec());
            db.put_cf(data, data_key(group, key.as_bytes()), rec.encode()).unwrap();
        }
        let meta = storage::cf(db, CF_GROUP_META);
        db.put_cf(meta, state_key(group, tag::APPLIED), bincode_encode(&log_id(1, 3)).unwrap()).unwrap();
        db.put_cf(meta, state_key(group, tag::SM_STATE), b"{\"applied\":3}").unwrap();
    }

    /// The state-machine records a snapshot carries.
    fn sm_records(db: &Db, group: u64) -> Vec<Option<Vec<u8>>> {
        [tag::APPLIED, tag::MEMBERSHIP, tag::SM_STATE].iter().map(|t| group_meta(db, group, *t)).collect()
    }

    /// A built snapshot of group 7 (filled by [`fill`] at `applied`), the
    /// database it came from and the folder of its files.
    struct Built {
        _dirs: (tempfile::TempDir, tempfile::TempDir),
        src: std::sync::Arc<Db>,
        root: PathBuf,
        meta: SnapshotMetaOf<TypeConfig>,
        file: SnapshotFile,
        live: (u64, u64),
    }

    fn built(applied: u64) -> Built {
        let (d, src) = temp_db();
        let root = tempfile::tempdir().unwrap();
        let live = fill(&src, 7, applied);
        let (meta, file) = build(&src, 7, root.path(), &Incarnation::default()).unwrap();
        Built { root: root.path().to_path_buf(), _dirs: (d, root), src, meta, file, live }
    }

    /// Group 7 of `db` holds exactly what the snapshot of `b` carries.
    fn assert_installed(db: &Db, b: &Built) {
        assert_eq!(group_data(db, 7), group_data(&b.src, 7), "the data, forward log included");
        assert_eq!(sm_records(db, 7), sm_records(&b.src, 7), "applied id, membership, state");
        let keys = group_meta(db, 7, tag::KEYS).map(|k| super::super::GroupStats::decode(&k));
        assert_eq!(keys, Some(b.live), "live user keys and bytes: no tombstone, no forward log");
        assert_eq!(group_meta(db, 7, tag::INSTALLING), None, "no install marker left");
    }

    #[test]
    fn an_installed_snapshot_replaces_the_group_exactly_and_nothing_else() {
        let b = built(9);
        assert_eq!(b.meta.last_log_id, Some(log_id(2, 9)));
        assert_eq!(read_meta(&b.file.path).unwrap(), b.meta);
        let (_d, db) = temp_db();
        fill_old(&db, 7);
        fill(&db, 6, 4);
        fill(&db, 8, 4);
        let neighbours = [6, 8].map(|g| (group_data(&db, g), sm_records(&db, g)));
        let (sm_state, stats) = install(&db, 7, &b.file, &Incarnation::default()).unwrap();
        assert_eq!(Some(sm_state), group_meta(&b.src, 7, tag::SM_STATE));
        assert_eq!(stats, b.live);
        assert_installed(&db, &b);
        assert_eq!([6, 8].map(|g| (group_data(&db, g), sm_records(&db, g))), neighbours, "other groups untouched");
    }

    #[test]
    fn an_install_cut_short_by_a_crash_is_redone_on_open() {
        let b = built(9);
        let dir = tempfile::tempdir().unwrap();
        {
            let db = storage::open(dir.path()).unwrap();
            fill_old(&db, 7);
            let old = group_data(&db, 7);
            crash::after_batches(2);
            let e = install(&db, 7, &b.file, &Incarnation::default()).unwrap_err();
            assert!(e.to_string().contains("simulated crash"), "{e}");
            // Half done: the old data is gone, part of the new is in.
            let now = group_data(&db, 7);
            assert!(now != old && !now.is_empty() && now.len() < group_data(&b.src, 7).len());
            assert_eq!(group_meta(&db, 7, tag::APPLIED), Some(bincode_encode(&log_id(1, 3)).unwrap()));
            assert!(group_meta(&db, 7, tag::INSTALLING).is_some(), "the marker says an install is under way");
        }
        let db = storage::open(dir.path()).unwrap();
        recover_install(&db, &b.root, 7).unwrap();
        assert_installed(&db, &b);
        let (meta, _) = latest(&b.root, 7).unwrap().expect("the installed snapshot is the current one");
        assert_eq!(meta, b.meta);
    }

    #[test]
    fn a_crash_before_the_first_batch_leaves_the_old_data_until_the_redo() {
        let b = built(9);
        let dir = tempfile::tempdir().unwrap();
        {
            let db = storage::open(dir.path()).unwrap();
            fill_old(&db, 7);
            let old = (group_data(&db, 7), sm_records(&db, 7));
            crash::after_batches(0);
            install(&db, 7, &b.file, &Incarnation::default()).unwrap_err();
            assert_eq!((group_data(&db, 7), sm_records(&db, 7)), old, "nothing deleted yet");
            assert!(group_meta(&db, 7, tag::INSTALLING).is_some());
        }
        let db = storage::open(dir.path()).unwrap();
        recover_install(&db, &b.root, 7).unwrap();
        assert_installed(&db, &b);
    }

    #[test]
    fn a_crash_while_redoing_an_install_is_redone_again() {
        let b = built(9);
        let dir = tempfile::tempdir().unwrap();
        {
            let db = storage::open(dir.path()).unwrap();
            fill_old(&db, 7);
            crash::after_batches(1);
            install(&db, 7, &b.file, &Incarnation::default()).unwrap_err();
        }
        {
            let db = storage::open(dir.path()).unwrap();
            crash::after_batches(1);
            recover_install(&db, &b.root, 7).unwrap_err();
            assert!(group_meta(&db, 7, tag::INSTALLING).is_some());
        }
        let db = storage::open(dir.path()).unwrap();
        recover_install(&db, &b.root, 7).unwrap();
        assert_installed(&db, &b);
    }

    #[test]
    fn opening_a_group_without_an_install_marker_changes_nothing() {
        let (_d, db) = temp_db();
        fill_old(&db, 7);
        let old = (group_data(&db, 7), sm_records(&db, 7));
        let other_root = tempfile::tempdir().unwrap();
        recover_install(&db, other_root.path(), 7).unwrap();
        assert_eq!((group_data(&db, 7), sm_records(&db, 7)), old);
        assert!(latest(other_root.path(), 7).unwrap().is_none(), "nothing adopted");
    }

    #[test]
    fn a_snapshot_cut_short_is_not_taken_for_a_whole_one() {
        let b = built(9);
        let bytes = fs::read(&b.file.path).unwrap();
        let cut = b.root.join("cut.snap");
        fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let (_d, db) = temp_db();
        fill_old(&db, 7);
        let e = install(&db, 7, &SnapshotFile { path: cut }, &Incarnation::default()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert_eq!(group_meta(&db, 7, tag::APPLIED), Some(bincode_encode(&log_id(1, 3)).unwrap()));
        assert!(group_meta(&db, 7, tag::INSTALLING).is_some(), "the half-replaced group must not open as it is");
    }

    #[test]
    fn a_newer_snapshot_replaces_the_older_file() {
        let b = built(5);
        fill(&b.src, 7, 9);
        let (meta, file) = build(&b.src, 7, &b.root, &Incarnation::default()).unwrap();
        let (latest_meta, latest_file) = latest(&b.root, 7).unwrap().unwrap();
        assert_eq!((latest_meta, latest_file.path), (meta, file.path));
        let files: Vec<_> = fs::read_dir(group_dir(&b.root, 7)).unwrap().flatten().collect();
        assert_eq!(files.len(), 1, "the older snapshot file is removed");
        assert!(!b.file.path.exists());
    }

    #[test]
    fn a_snapshot_of_a_group_that_applied_nothing_empties_the_replica() {
        let (_s, src) = temp_db();
        let root = tempfile::tempdir().unwrap();
        src.put_cf(storage::cf(&src, CF_GROUP_META), state_key(7, tag::SM_STATE), b"{}").unwrap();
        let (meta, file) = build(&src, 7, root.path(), &Incarnation::default()).unwrap();
        assert_eq!(meta.last_log_id, None);
        let (_d, db) = temp_db();
        fill_old(&db, 7);
        let (_, stats) = install(&db, 7, &file, &Incarnation::default()).unwrap();
        assert_eq!(stats, (0, 0));
        assert!(group_data(&db, 7).is_empty(), "no old key is left");
        assert_eq!(group_meta(&db, 7, tag::APPLIED), None, "the old applied id is gone with the data");
        assert_eq!(group_meta(&db, 7, tag::SM_STATE).as_deref(), Some(&b"{}"[..]));
    }

    #[test]
    fn a_received_snapshot_becomes_the_current_one_once_installed() {
        let b = built(9);
        let (_d, db) = temp_db();
        let root = tempfile::tempdir().unwrap();
        let part = receive_path(root.path(), 7, 1).unwrap();
        fs::copy(&b.file.path, &part).unwrap();
        let received = finish_receive(&part).unwrap();
        assert!(latest(root.path(), 7).unwrap().is_none(), "not current before it is installed");
        install(&db, 7, &received, &Incarnation::default()).unwrap();
        adopt(root.path(), 7, &received).unwrap();
        assert_installed(&db, &b);
        let (meta, file) = latest(root.path(), 7).unwrap().unwrap();
        assert_eq!((meta, fs::read(&file.path).unwrap()), (b.meta.clone(), fs::read(&b.file.path).unwrap()));
        // A transfer that broke off leaves a partial file; it is removed,
        // the current snapshot is not.
        let broken = receive_path(root.path(), 7, 2).unwrap();
        fs::write(&broken, b"CLVSNAP1").unwrap();
        remove_partial(root.path(), 7);
        assert!(!broken.exists() && !part.exists());
        assert!(file.path.exists());
    }
}
