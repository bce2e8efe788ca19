//! Backfill as files: the moving range travels to the split target as
//! RocksDB table files (SSTs), ingested directly into each target replica's
//! state, never through the target's Raft log.
//!
//! Why: through the log, every backfilled record was written to the log,
//! replicated, applied and written again to state — four writes of every
//! byte and a consensus round per megabyte, while the foreground waited
//! behind it. As files, each byte is read once from a RocksDB snapshot of
//! the source, written once to a file, sent once to each replica and
//! linked into its database (`ingest_external_file` with move-files): the
//! way TiKV applies snapshots and CockroachDB sideloads `AddSSTable`.
//!
//! The three steps, and who does them:
//! 1. [`write_files`] (the source's leader): one RocksDB snapshot of the
//!    source at applied index `s`; the range's records, under the
//!    *target's* keys, into files of at most [`FILE_BYTES`]; the last file
//!    also holds a marker naming the operation and this attempt. Each file
//!    gets an xxh3 hash. The copy is throttled ([`RateLimit`]).
//! 2. [`receive_chunk`] (each target replica's node): chunks of a file are
//!    appended in order to a staging file; the last chunk checks the
//!    file's hash (a mismatch deletes the file and refuses — wrong bytes
//!    are never ingested), then syncs it. A replica that restarts
//!    mid-transfer has a partial file that the next attempt starts over.
//!    Attempts are kept side by side (two forwarders may overlap when the
//!    source's leader changes, and either's files may be the ones the log
//!    names) until the backfill is recorded, the replica installs a
//!    snapshot, or the target is deleted.
//! 3. [`ingest_staged`] (every target replica, when it applies the
//!    `BackfillFiles` entry that names the attempt and its files): the
//!    staged files are checked against the entry's lengths and ingested
//!    in one call, atomically. The entry is proposed
//!    only after every replica has acknowledged every file, so each one
//!    applies it with its files at hand. Replaying the entry after a crash
//!    finds the marker and does not ingest twice.
//!
//! The target's range is empty until then: forwarded writes are shipped
//! only after the `BackfillFiles` entry, so ingested files (which RocksDB
//! lays over everything older) never hide a newer write.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cleave_metadata::OpId;
use serde::{Deserialize, Serialize};

use crate::kv;
use crate::raft::SmState;
use crate::split::digest;
use crate::storage::{self, data_key, state_key, tag, Db};

/// Target size of one file (the last record may take it a little over).
#[cfg(not(test))]
pub const FILE_BYTES: u64 = 64 << 20;
/// Small in tests, so that a small range makes several files.
#[cfg(test)]
pub const FILE_BYTES: u64 = 16 << 10;
/// Bytes per chunk on the wire.
pub const CHUNK_BYTES: usize = 4 << 20;
/// Most files one backfill may have (4 TiB at 64 MiB): bounds what a
/// receiver accepts.
pub const MAX_FILES: u32 = 1 << 16;
/// Largest file a receiver accepts.
const MAX_FILE_LEN: u64 = 4 * (64 << 20);

/// One file of a backfill, as the target's log names it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SstFile {
    pub len: u64,
    /// xxh3-64 of the file's bytes.
    pub hash: u64,
}

/// What the source copied: the figures the `BackfillFiles` entry carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// The source's applied index at the snapshot.
    pub snapshot_index: u64,
    /// Content digest of the copied records.
    pub digest: u64,
    /// The range's digest when the capture began (see `forwarder`).
    pub capture_base: u64,
    /// Live keys and bytes copied (the target's stats grow by them).
    pub live_keys: u64,
    pub live_bytes: u64,
    /// Records and bytes read, tombstones included (progress).
    pub records: u64,
    pub bytes: u64,
}

impl Written {
    /// The entry that records this backfill in the target's log: the copy's
    /// figures and the files of `attempt`.
    pub fn command(&self, op_id: OpId, attempt: u64, files: Vec<SstFile>) -> crate::command::ShardCommand {
        crate::command::ShardCommand::BackfillFiles {
            op_id,
            snapshot_index: self.snapshot_index,
            digest: self.digest,
            capture_base: self.capture_base,
            keys: self.records,
            bytes: self.bytes,
            live: (self.live_keys, self.live_bytes),
            attempt,
            files,
        }
    }
}

/// Staging directory of one group's incoming backfills: inside the
/// group's snapshot folder, so it goes with the replica when the replica
/// is created, destroyed or collected.
pub fn staging_dir(root: &Path, group: u64) -> PathBuf {
    crate::raft::snapshot::group_dir(root, group).join("split-in")
}

/// Staging directory of one attempt.
pub fn attempt_dir(root: &Path, group: u64, op: OpId, attempt: u64) -> PathBuf {
    staging_dir(root, group).join(format!("op{op}-{attempt:016x}"))
}

/// Where a node writes the files of the backfills it ships.
pub fn outbox_root(root: &Path) -> PathBuf {
    root.join("split-out")
}

/// Where the source writes the files of one attempt.
pub fn outbox_dir(root: &Path, source: u64, op: OpId, attempt: u64) -> PathBuf {
    outbox_root(root).join(format!("g{source}-op{op}-{attempt:016x}"))
}

/// File `n` of an attempt's directory.
pub fn file_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{n:06}.sst"))
}

/// Removes a directory tree, ignoring one that is not there.
pub fn remove_dir(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The xxh3-64 of a file.
pub fn file_hash(path: &Path) -> io::Result<(u64, u64)> {
    let mut f = File::open(path)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((len, h.digest()));
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
}

/// A byte-rate limit for the copy (0: none). Sleeps the copying thread
/// when it runs ahead of the rate: the backfill shares the node with the
/// foreground, and a copy as fast as the disk would starve it.
pub struct RateLimit {
    bytes_per_s: u64,
    start: Instant,
    done: u64,
}

impl RateLimit {
    pub fn new(bytes_per_s: u64) -> RateLimit {
        RateLimit { bytes_per_s, start: Instant::now(), done: 0 }
    }

    /// How long to wait after `n` more bytes to keep to the rate.
    fn wait_after(&mut self, n: u64, elapsed: Duration) -> Duration {
        self.done += n;
        if self.bytes_per_s == 0 {
            return Duration::ZERO;
        }
        let due = Duration::from_secs_f64(self.done as f64 / self.bytes_per_s as f64);
        due.saturating_sub(elapsed)
    }

    /// Accounts `n` bytes, sleeping while ahead of the rate (blocking).
    pub fn consume(&mut self, n: u64) {
        let wait = self.wait_after(n, self.start.elapsed());
        // Short waits are gathered into longer ones: sleeping per record
        // would cost more than the copy.
        if wait >= Duration::from_millis(5) {
            std::thread::sleep(wait);
        }
    }
}

/// Options of the files: those of the data column family (`storage`).
fn writer_options() -> rocksdb::Options {
    storage::data_cf_options()
}

/// Writes the range `[start, end)` of `source`, read from one RocksDB
/// snapshot, as files under `dir` holding the records under `target`'s
/// keys, plus the marker of (`op`, `attempt`) in the last one. Each
/// finished file is handed to `sink` (number, path, length and hash, and
/// the records and bytes copied so far) as soon as it is closed, so
/// shipping overlaps writing. Blocking.
#[allow(clippy::too_many_arguments)]
pub fn write_files(
    db: &Db,
    source: u64,
    target: u64,
    op: OpId,
    attempt: u64,
    (start, end): (&str, Option<&str>),
    dir: &Path,
    limit: &mut RateLimit,
    mut sink: impl FnMut(u32, PathBuf, SstFile, (u64, u64)) -> io::Result<()>,
) -> io::Result<Written> {
    let snap = db.snapshot();
    let meta_cf = storage::cf(db, storage::CF_GROUP_META);
    let s = snap
        .get_cf(meta_cf, state_key(source, tag::APPLIED))
        .map_err(storage::io_err)?
        .and_then(|b| crate::raft::decode_applied_index(&b))
        .unwrap_or(0);
    let sm_state = snap.get_cf(meta_cf, state_key(source, tag::SM_STATE)).map_err(storage::io_err)?;
    let changes_at_s = match sm_state.map(|b| SmState::from_json(&b)).transpose()? {
        Some(SmState::Shard(st)) => st.captures.iter().find(|c| c.op_id == op).map(|c| c.changes),
        _ => None,
    }
    .ok_or_else(|| io::Error::other(format!("the backfill snapshot at {s} holds no capture of operation {op}")))?;

    remove_dir(dir)?;
    fs::create_dir_all(dir)?;
    let cf = storage::cf(db, storage::CF_DATA);
    let upper = match end {
        Some(e) => data_key(source, e.as_bytes()),
        None => kv::user_data_end(source),
    };
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(upper);
    opts.set_snapshot(&snap);
    opts.fill_cache(false);
    let iter = db.iterator_cf_opt(
        cf,
        opts,
        rocksdb::IteratorMode::From(&data_key(source, start.as_bytes()), rocksdb::Direction::Forward),
    );

    let wopts = writer_options();
    let mut out = Written { snapshot_index: s, ..Written::default() };
    let mut n = 0u32;
    let mut writer: Option<(rocksdb::SstFileWriter<'_>, PathBuf)> = None;
    let mut finish = |mut w: rocksdb::SstFileWriter<'_>, path: PathBuf, n: u32, so_far: (u64, u64)| {
        w.finish().map_err(storage::io_err)?;
        File::open(&path)?.sync_all()?;
        let (len, hash) = file_hash(&path)?;
        sink(n, path, SstFile { len, hash }, so_far)
    };
    for item in iter {
        let (k, v) = item.map_err(storage::io_err)?;
        let user_key = storage::user_key_of(&k);
        let rec = storage::decode_record(user_key, &v)?;
        let key = std::str::from_utf8(user_key).map_err(|_| io::Error::other("a stored key is not UTF-8"))?;
        if writer.as_ref().is_some_and(|(w, _)| w.file_size() >= FILE_BYTES) {
            let (w, path) = writer.take().expect("checked");
            finish(w, path, n, (out.records, out.bytes))?;
            n += 1;
        }
        out.digest = out.digest.wrapping_add(digest::record_hash(key, &rec));
        let live = kv::StatsDelta::replace(key, None, &rec);
        out.live_keys += live.keys as u64;
        out.live_bytes += live.bytes as u64;
        out.records += 1;
        out.bytes += (user_key.len() + v.len()) as u64;
        if writer.is_none() {
            let w = rocksdb::SstFileWriter::create(&wopts);
            let path = file_path(dir, n);
            w.open(&path).map_err(storage::io_err)?;
            writer = Some((w, path));
        }
        let (w, _) = writer.as_mut().expect("opened");
        w.put(data_key(target, user_key), &v).map_err(storage::io_err)?;
        limit.consume((user_key.len() + v.len()) as u64);
    }
    // The marker, after every user key: in the last file (or alone in the
    // only one when the range is empty).
    let (mut w, path) = match writer.take() {
        Some(w) => w,
        None => {
            let w = rocksdb::SstFileWriter::create(&wopts);
            let path = file_path(dir, n);
            w.open(&path).map_err(storage::io_err)?;
            (w, path)
        }
    };
    w.put(kv::backfill_marker_key(target, op), attempt.to_be_bytes()).map_err(storage::io_err)?;
    finish(w, path, n, (out.records, out.bytes))?;
    out.capture_base = out.digest.wrapping_sub(changes_at_s);
    Ok(out)
}

/// One chunk of a backfill file, as a target replica's node receives it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Chunk {
    pub group: u64,
    pub replica_id: u64,
    pub op_id: OpId,
    pub attempt: u64,
    pub file: u32,
    pub offset: u64,
    pub file_len: u64,
    /// xxh3-64 of the whole file: checked when its last chunk is in.
    pub hash: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Why a chunk was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("chunk out of bounds: {0}")]
    Bounds(String),
    #[error("chunk at offset {got} of file {file}, expected {expected}: the file starts over")]
    Order { file: u32, got: u64, expected: u64 },
    #[error("file {file} of operation {op} does not match its checksum (got {got:016x}, expected {expected:016x})")]
    Checksum { op: OpId, file: u32, got: u64, expected: u64 },
    #[error("staging a backfill file: {0}")]
    Io(String),
}

/// Appends one chunk to its staging file under `root`; the file's last
/// chunk checks the whole file against its hash and syncs it. Whether the
/// replica may receive at all is the caller's to check. Blocking.
pub fn receive_chunk(root: &Path, c: &Chunk) -> Result<(), ChunkError> {
    let end = c.offset.checked_add(c.data.len() as u64).ok_or(ChunkError::Bounds("offset overflows".into()))?;
    if c.file >= MAX_FILES || c.file_len > MAX_FILE_LEN || end > c.file_len || c.data.len() > CHUNK_BYTES {
        return Err(ChunkError::Bounds(format!(
            "file {} offset {} len {} of {}",
            c.file,
            c.offset,
            c.data.len(),
            c.file_len
        )));
    }
    let io = |e: io::Error| ChunkError::Io(e.to_string());
    let dir = attempt_dir(root, c.group, c.op_id, c.attempt);
    create_dir_synced(&dir).map_err(io)?;
    let path = file_path(&dir, c.file);
    let mut f = if c.offset == 0 {
        File::create(&path).map_err(io)?
    } else {
        let f = fs::OpenOptions::new().append(true).open(&path).map_err(|_| ChunkError::Order {
            file: c.file,
            got: c.offset,
            expected: 0,
        })?;
        let have = f.metadata().map_err(io)?.len();
        if have != c.offset {
            return Err(ChunkError::Order { file: c.file, got: c.offset, expected: have });
        }
        f
    };
    f.write_all(&c.data).map_err(io)?;
    if end == c.file_len {
        drop(f);
        let (len, got) = file_hash(&path).map_err(io)?;
        if len != c.file_len || got != c.hash {
            let _ = fs::remove_file(&path);
            return Err(ChunkError::Checksum { op: c.op_id, file: c.file, got, expected: c.hash });
        }
        File::open(&path).and_then(|f| f.sync_all()).map_err(io)?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

/// Creates `dir` and its missing parents, each made durable in its own
/// parent: a staged file is acknowledged only once a crash cannot lose it.
fn create_dir_synced(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_synced(parent)?;
        match fs::create_dir(dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => File::open(parent)?.sync_all()?,
        }
    }
    Ok(())
}

/// Removes the staged files of `group` once they can no longer be needed
/// (the backfill is recorded, or never will be here): best effort, a
/// leftover goes with the group's folder.
pub fn remove_staged(root: &Path, group: u64) {
    if let Err(e) = remove_dir(&staging_dir(root, group)) {
        tracing::warn!(group, "removing staged backfill files: {e}");
    }
}

/// Links a file the source wrote on this node into the local replica's
/// staging directory (no copy, no network): the replica sits beside the
/// source. Blocking.
pub fn stage_local(root: &Path, group: u64, op: OpId, attempt: u64, n: u32, from: &Path) -> io::Result<()> {
    let dir = attempt_dir(root, group, op, attempt);
    create_dir_synced(&dir)?;
    let to = file_path(&dir, n);
    let _ = fs::remove_file(&to);
    if fs::hard_link(from, &to).is_err() {
        fs::copy(from, &to)?;
        File::open(&to)?.sync_all()?;
    }
    File::open(&dir)?.sync_all()
}

/// Ingests the staged files of (`op`, `attempt`) into `group`, unless a
/// crash after an earlier ingest already put them there (the marker says
/// so). A file missing or unlike its description is an error: the replica
/// cannot apply the entry and stops. Blocking; call with the group's apply
/// batch written.
pub fn ingest_staged(db: &Db, root: &Path, group: u64, op: OpId, attempt: u64, files: &[SstFile]) -> io::Result<()> {
    let cf = storage::cf(db, storage::CF_DATA);
    if db.get_cf(cf, kv::backfill_marker_key(group, op)).map_err(storage::io_err)?.as_deref()
        == Some(&attempt.to_be_bytes()[..])
    {
        return Ok(());
    }
    let dir = attempt_dir(root, group, op, attempt);
    let mut paths = Vec::with_capacity(files.len());
    for (n, want) in files.iter().enumerate() {
        // Each file's hash was checked when it arrived, before it was
        // acknowledged; here, that it is still the file that was (reading
        // it all again would stall the apply), and RocksDB checks its
        // blocks' own checksums as it reads them.
        let path = file_path(&dir, n as u32);
        let len = fs::metadata(&path)
            .map_err(|e| io::Error::other(format!("backfill file {} of operation {op}: {e}", path.display())))?
            .len();
        if len != want.len {
            return Err(io::Error::other(format!(
                "backfill file {} of operation {op} has {len} bytes, not {}",
                path.display(),
                want.len
            )));
        }
        paths.push(path);
    }
    let mut opts = rocksdb::IngestExternalFileOptions::default();
    opts.set_move_files(true);
    db.ingest_external_file_cf_opts(cf, &opts, paths).map_err(storage::io_err)?;
    remove_staged(root, group);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testing::{group_data, split_source, temp_db, GROUP};

    const TARGET: u64 = 9;
    const OP: OpId = 5;
    const ATTEMPT: u64 = 77;

    fn source(n: usize) -> (tempfile::TempDir, Arc<Db>) {
        split_source(n, OP, TARGET)
    }

    fn write(db: &Db, out: &Path) -> (Written, Vec<(PathBuf, SstFile)>) {
        let mut files = Vec::new();
        let w = write_files(db, GROUP, TARGET, OP, ATTEMPT, ("m", None), out, &mut RateLimit::new(0), |n, p, f, _| {
            assert_eq!(n as usize, files.len(), "files come in order");
            files.push((p, f));
            Ok(())
        })
        .unwrap();
        (w, files)
    }

    /// Sends file `n` to `root` in chunks of `size` bytes.
    fn send(root: &Path, n: u32, path: &Path, f: &SstFile, size: usize) -> Result<(), ChunkError> {
        let bytes = fs::read(path).unwrap();
        for (i, part) in bytes.chunks(size).enumerate() {
            let c = Chunk {
                group: TARGET,
                replica_id: 1,
                op_id: OP,
                attempt: ATTEMPT,
                file: n,
                offset: (i * size) as u64,
                file_len: f.len,
                hash: f.hash,
                data: part.to_vec(),
            };
            receive_chunk(root, &c)?;
        }
        Ok(())
    }

    /// The user records of `group`: (user key, stored bytes).
    fn user_records(db: &Db, group: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
        let end = kv::user_data_end(group);
        group_data(db, group).into_iter().filter(|(k, _)| *k < end).map(|(k, v)| (k[8..].to_vec(), v)).collect()
    }

    #[test]
    fn the_range_travels_as_files_under_the_target_keys_and_is_ingested_once() {
        let (_s, src) = source(300);
        let out = tempfile::tempdir().unwrap();
        let (w, files) = write(&src, out.path());
        assert!(files.len() > 2, "{} files: bounded in size", files.len());
        let moving: Vec<_> =
            user_records(&src, GROUP).into_iter().filter(|(k, _)| k.as_slice() >= b"m".as_slice()).collect();
        assert_eq!(w.records as usize, moving.len());
        assert_eq!(w.live_keys as usize, moving.len());
        let digest = moving.iter().fold(0u64, |d, (k, v)| {
            d.wrapping_add(digest::record_hash(
                std::str::from_utf8(k).unwrap(),
                &crate::storage::ValueRecord::decode(v).unwrap(),
            ))
        });
        assert_eq!(w.digest, digest, "the digest of exactly what the files hold");
        assert_eq!(w.capture_base, digest, "no change captured before the snapshot");

        // Another node receives them in chunks and ingests them.
        let (_t, dst) = temp_db();
        let root = tempfile::tempdir().unwrap();
        for (n, (p, f)) in files.iter().enumerate() {
            send(root.path(), n as u32, p, f, 3000).unwrap();
        }
        let described: Vec<SstFile> = files.iter().map(|(_, f)| f.clone()).collect();
        ingest_staged(&dst, root.path(), TARGET, OP, ATTEMPT, &described).unwrap();
        assert_eq!(user_records(&dst, TARGET), moving, "the moving half, under the target's keys");
        assert!(user_records(&dst, GROUP).is_empty(), "nothing under the source's keys");
        let marker = dst.get_cf(storage::cf(&dst, storage::CF_DATA), kv::backfill_marker_key(TARGET, OP)).unwrap();
        assert_eq!(marker.as_deref(), Some(&ATTEMPT.to_be_bytes()[..]));
        assert!(!staging_dir(root.path(), TARGET).exists(), "staged files are consumed");
        // A replay (a crash before the entry's batch landed) ingests nothing
        // and needs no files.
        ingest_staged(&dst, root.path(), TARGET, OP, ATTEMPT, &described).unwrap();
        assert_eq!(user_records(&dst, TARGET), moving);
    }

    #[test]
    fn an_empty_range_makes_one_file_with_the_marker() {
        let (_s, src) = source(0);
        let out = tempfile::tempdir().unwrap();
        let (w, files) = write(&src, out.path());
        assert_eq!((w.records, files.len()), (0, 1));
        let (_t, dst) = temp_db();
        let root = tempfile::tempdir().unwrap();
        send(root.path(), 0, &files[0].0, &files[0].1, CHUNK_BYTES).unwrap();
        ingest_staged(&dst, root.path(), TARGET, OP, ATTEMPT, &[files[0].1.clone()]).unwrap();
        assert_eq!(group_data(&dst, TARGET).len(), 1, "the marker alone");
    }

    #[test]
    fn damaged_out_of_order_or_oversized_chunks_are_refused() {
        let (_s, src) = source(100);
        let out = tempfile::tempdir().unwrap();
        let (_, files) = write(&src, out.path());
        let (path, f) = &files[0];
        let root = tempfile::tempdir().unwrap();
        let bytes = fs::read(path).unwrap();
        let chunk = |offset: usize, data: Vec<u8>| Chunk {
            group: TARGET,
            replica_id: 1,
            op_id: OP,
            attempt: ATTEMPT,
            file: 0,
            offset: offset as u64,
            file_len: f.len,
            hash: f.hash,
            data,
        };
        // One flipped bit: refused by checksum, and the file is not kept.
        let mut bad = bytes.clone();
        bad[bytes.len() / 2] ^= 1;
        let err = receive_chunk(root.path(), &chunk(0, bad)).unwrap_err();
        assert!(matches!(err, ChunkError::Checksum { file: 0, .. }), "{err}");
        let staged = file_path(&attempt_dir(root.path(), TARGET, OP, ATTEMPT), 0);
        assert!(!staged.exists(), "a damaged file is removed");
        // A gap: the file must start over.
        receive_chunk(root.path(), &chunk(0, bytes[..100].to_vec())).unwrap();
        let err = receive_chunk(root.path(), &chunk(200, bytes[200..300].to_vec())).unwrap_err();
        assert_eq!(err, ChunkError::Order { file: 0, got: 200, expected: 100 });
        // Starting over works.
        receive_chunk(root.path(), &chunk(0, bytes.clone())).unwrap();
        assert_eq!(file_hash(&staged).unwrap(), (f.len, f.hash));
        // Bounds: past the file's end, an absurd file number or size.
        assert!(matches!(receive_chunk(root.path(), &chunk(bytes.len(), vec![1])), Err(ChunkError::Bounds(_))));
        let mut c = chunk(0, vec![]);
        c.file = MAX_FILES;
        assert!(matches!(receive_chunk(root.path(), &c), Err(ChunkError::Bounds(_))));
        let mut c = chunk(u64::MAX as usize, vec![1]);
        c.file_len = u64::MAX;
        assert!(matches!(receive_chunk(root.path(), &c), Err(ChunkError::Bounds(_))));
    }

    #[test]
    fn attempts_are_staged_side_by_side_until_the_backfill_is_recorded() {
        // Two forwarders may overlap for a moment (a change of the source's
        // leader): the files of either may be the ones the log names.
        let root = tempfile::tempdir().unwrap();
        let data = b"x".to_vec();
        let hash = xxhash_rust::xxh3::xxh3_64(&data);
        for attempt in [1, 2] {
            let c = Chunk {
                group: TARGET,
                replica_id: 1,
                op_id: OP,
                attempt,
                file: 0,
                offset: 0,
                file_len: 1,
                hash,
                data: data.clone(),
            };
            receive_chunk(root.path(), &c).unwrap();
        }
        for attempt in [1, 2] {
            assert!(file_path(&attempt_dir(root.path(), TARGET, OP, attempt), 0).exists());
        }
        remove_staged(root.path(), TARGET);
        assert!(!staging_dir(root.path(), TARGET).exists());
    }

    #[test]
    fn missing_or_changed_files_are_not_ingested() {
        let (_s, src) = source(50);
        let out = tempfile::tempdir().unwrap();
        let (_, files) = write(&src, out.path());
        let described: Vec<SstFile> = files.iter().map(|(_, f)| f.clone()).collect();
        let (_t, dst) = temp_db();
        let root = tempfile::tempdir().unwrap();
        assert!(ingest_staged(&dst, root.path(), TARGET, OP, ATTEMPT, &described).is_err(), "nothing staged");
        for (n, (p, f)) in files.iter().enumerate() {
            send(root.path(), n as u32, p, f, CHUNK_BYTES).unwrap();
        }
        let mut wrong = described.clone();
        wrong[0].len += 1;
        assert!(ingest_staged(&dst, root.path(), TARGET, OP, ATTEMPT, &wrong).is_err());
        assert!(group_data(&dst, TARGET).is_empty(), "nothing ingested");
    }

    #[test]
    fn the_rate_limit_waits_for_the_bytes_ahead_of_it() {
        let mut l = RateLimit::new(1000);
        assert_eq!(l.wait_after(500, Duration::ZERO), Duration::from_millis(500));
        assert_eq!(l.wait_after(500, Duration::from_secs(2)), Duration::ZERO, "behind the rate: no wait");
        let mut none = RateLimit::new(0);
        assert_eq!(none.wait_after(u64::MAX / 2, Duration::ZERO), Duration::ZERO);
    }
}
