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
//!    *target's* keys, into files of at most [`FILE_BYTES`] (small enough
//!    that shipping one overlaps writing the next); the last file also
//!    holds a marker naming the operation and this attempt. The copy is
//!    throttled ([`RateLimit`]). The forwarder reads each finished file
//!    once, in chunks, hashing it (xxh3) and sending every chunk to all
//!    remote replicas at once; a replica on the same node gets a link.
//! 2. [`receive_chunk`](super::receive::receive_chunk) (each target
//!    replica's node): chunks of a file are appended in order to a staging
//!    file, hashed as they pass; the last chunk checks the file's hash (a
//!    mismatch deletes the file and refuses — wrong bytes are never
//!    ingested), then syncs it. A replica that restarts mid-transfer has a
//!    partial file that the next attempt starts over.
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
use std::io::{self, Read};
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
pub const FILE_BYTES: u64 = 16 << 20;
/// Small in tests, so that a small range makes several files.
#[cfg(test)]
pub const FILE_BYTES: u64 = 16 << 10;
/// Bytes per chunk on the wire.
pub const CHUNK_BYTES: usize = 4 << 20;
/// Most files one backfill may have (1 TiB at 16 MiB): bounds what a
/// receiver accepts.
pub const MAX_FILES: u32 = 1 << 16;
/// Largest file a receiver accepts.
pub const MAX_FILE_LEN: u64 = 256 << 20;

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

/// Reads a file in chunks of [`CHUNK_BYTES`], hashing (xxh3-64) what it
/// reads: the forwarder sends each chunk as it comes and learns the
/// file's hash with the last one, in one read of the file.
pub struct ChunkReader {
    file: File,
    hash: xxhash_rust::xxh3::Xxh3,
    offset: u64,
    len: u64,
}

impl ChunkReader {
    pub fn open(path: &Path) -> io::Result<ChunkReader> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(ChunkReader { file, hash: xxhash_rust::xxh3::Xxh3::new(), offset: 0, len })
    }

    /// The file's length when it was opened.
    pub fn file_len(&self) -> u64 {
        self.len
    }

    /// The next chunk and its offset, or `None` past the end. Blocking.
    pub fn next_chunk(&mut self) -> io::Result<Option<(u64, Vec<u8>)>> {
        let want = (self.len - self.offset).min(CHUNK_BYTES as u64) as usize;
        if want == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; want];
        self.file.read_exact(&mut buf)?;
        self.hash.update(&buf);
        let at = self.offset;
        self.offset += want as u64;
        Ok(Some((at, buf)))
    }

    /// Whether every chunk has been read.
    pub fn is_done(&self) -> bool {
        self.offset == self.len
    }

    /// The hash of the chunks read so far: the file's, once all are.
    pub fn hash(&self) -> u64 {
        self.hash.digest()
    }
}

/// The length and xxh3-64 of a file (tests: the forwarder hashes a file
/// as it sends it, with [`ChunkReader`]).
#[cfg(test)]
pub fn file_hash(path: &Path) -> io::Result<(u64, u64)> {
    let mut r = ChunkReader::open(path)?;
    while r.next_chunk()?.is_some() {}
    Ok((r.file_len(), r.hash()))
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
/// finished file is handed to `sink` (number, path, length, and
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
    mut sink: impl FnMut(u32, PathBuf, u64, (u64, u64)) -> io::Result<()>,
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
        let f = File::open(&path)?;
        f.sync_all()?;
        let len = f.metadata()?.len();
        sink(n, path, len, so_far)
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
        // Each file's bytes were hashed as they arrived and checked before
        // the file was acknowledged (`receive`); here, that it is still the
        // file that was (reading it all again would stall the apply), and
        // RocksDB checks its blocks' own checksums as it reads them.
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
    super::receive::remove_staged(root, group);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::split::receive::{self, Receiving};
    use crate::testing::{group_data, split_source, temp_db, GROUP};

    const TARGET: u64 = 9;
    const OP: OpId = 5;
    const ATTEMPT: u64 = 77;

    fn source(n: usize) -> (tempfile::TempDir, Arc<Db>) {
        split_source(n, OP, TARGET)
    }

    fn write(db: &Db, out: &Path) -> (Written, Vec<(PathBuf, SstFile)>) {
        let mut files = Vec::new();
        let w =
            write_files(db, GROUP, TARGET, OP, ATTEMPT, ("m", None), out, &mut RateLimit::new(0), |n, p, len, _| {
                assert_eq!(n as usize, files.len(), "files come in order");
                let (hashed_len, hash) = file_hash(&p).unwrap();
                assert_eq!(hashed_len, len, "the length handed on is the file's");
                files.push((p, SstFile { len, hash }));
                Ok(())
            })
            .unwrap();
        (w, files)
    }

    /// Sends file `n` to a node whose staging root is `root`, in chunks of
    /// `size` bytes.
    fn send(root: &Path, n: u32, path: &Path, f: &SstFile, size: usize) {
        receive::tests::send(root, &Receiving::default(), (TARGET, OP, ATTEMPT, n), path, f, size).unwrap();
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
            send(root.path(), n as u32, p, f, 3000);
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
        send(root.path(), 0, &files[0].0, &files[0].1, CHUNK_BYTES);
        ingest_staged(&dst, root.path(), TARGET, OP, ATTEMPT, &[files[0].1.clone()]).unwrap();
        assert_eq!(group_data(&dst, TARGET).len(), 1, "the marker alone");
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
            send(root.path(), n as u32, p, f, CHUNK_BYTES);
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
