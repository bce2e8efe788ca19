//! A split target replica's side of a backfill's transfer: the chunks of
//! each table file arrive in order and are staged in a file beside the
//! replica, checked against the file's hash, and made durable, before the
//! sender hears that the file is in (see [`super::sst`] for the whole
//! path).
//!
//! Two things make receiving cheap, and both matter on a box where the
//! copy competes with the foreground for two cores:
//! - **The hash is kept as the chunks pass** ([`Receiving`]: the hash of
//!   each file so far, in memory), not computed by reading the file again
//!   once it is complete.
//! - **Chunks go to disk with `O_DIRECT`** where the file system allows it:
//!   a buffered write copies every byte into the page cache, and that copy
//!   (`copy_folio_from_iter_atomic`) was 18–40 % of each receiving node's
//!   CPU samples during a split on the 2-core box. Only a file's unaligned tail is written buffered.
//!   The file is read once more, by RocksDB, after it is ingested.
//!
//! A file is staged as `NNNNNN.sst.part` and renamed to its final name only
//! once complete, hashed and synced: a file under that name is always a
//! verified one. Chunks of one file are taken one at a time (a second one
//! while the first is written is refused), and at most
//! [`MOST_AT_ONCE`] chunks are staged at once on a node.
//!
//! A replica that restarts mid-transfer has lost the in-memory hash: the
//! file's next chunk is refused as out of order, and the sender starts the
//! file (the whole attempt) over.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
#[cfg(not(unix))]
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cleave_metadata::OpId;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use super::sst::{attempt_dir, file_path, staging_dir, CHUNK_BYTES, MAX_FILES, MAX_FILE_LEN};

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
    /// xxh3-64 of the whole file, on its last chunk (the sender hashes the
    /// file as it reads it for sending): checked there.
    pub hash: Option<u64>,
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

/// A file in flight: (group, operation, attempt, file number).
type FileId = (u64, OpId, u64, u32);

/// How long a file may wait for its next chunk before its hash is
/// dropped (its sender gave up; a late chunk then starts the file over).
const ABANDONED_AFTER: Duration = Duration::from_secs(600);
/// Most files in flight on a node (beyond it the oldest is dropped, and
/// its next chunk starts it over): a split has one file in flight per
/// attempt, and attempts are few.
const MOST_IN_FLIGHT: usize = 64;
/// Most chunks staged at once on a node (each holds a thread and a few
/// megabytes); more wait their turn.
pub const MOST_AT_ONCE: usize = 4;

/// The files this node is receiving, each with the length and hash of what
/// has arrived so far, and when. An entry goes when its file is complete or
/// refused, or once abandoned. Clones share the table.
#[derive(Clone)]
pub struct Receiving {
    files: Arc<Mutex<HashMap<FileId, Slot>>>,
    /// Bounds the chunks staged at once (see [`MOST_AT_ONCE`]).
    pub permits: Arc<tokio::sync::Semaphore>,
}

impl Default for Receiving {
    fn default() -> Receiving {
        Receiving { files: Arc::default(), permits: Arc::new(tokio::sync::Semaphore::new(MOST_AT_ONCE)) }
    }
}

enum Slot {
    /// A chunk of the file is being written right now.
    Busy,
    Idle(Box<InFlight>),
}

struct InFlight {
    len: u64,
    hash: Xxh3,
    at: Instant,
}

/// A file claimed by one chunk: no other chunk of it runs until the claim
/// is dropped, which puts back what the chunk left (or nothing).
struct Claim<'a> {
    receiving: &'a Receiving,
    id: FileId,
    left: Option<(u64, Xxh3)>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut files = self.receiving.files.lock().unwrap();
        match self.left.take() {
            Some((len, hash)) => {
                files.insert(self.id, Slot::Idle(Box::new(InFlight { len, hash, at: Instant::now() })));
            }
            None => {
                files.remove(&self.id);
            }
        }
    }
}

impl Receiving {
    /// Claims file `id` for one chunk, with what it has so far; `None` if
    /// another chunk of it is being written.
    fn claim(&self, id: FileId) -> Option<(Claim<'_>, Option<Box<InFlight>>)> {
        let mut files = self.files.lock().unwrap();
        files.retain(|_, f| !matches!(f, Slot::Idle(f) if f.at.elapsed() >= ABANDONED_AFTER));
        if files.len() >= MOST_IN_FLIGHT && !files.contains_key(&id) {
            let oldest = files
                .iter()
                .filter_map(|(k, f)| match f {
                    Slot::Idle(f) => Some((f.at, *k)),
                    Slot::Busy => None,
                })
                .min();
            if let Some((_, k)) = oldest {
                files.remove(&k);
            }
        }
        let held = match files.insert(id, Slot::Busy) {
            Some(Slot::Busy) => return None,
            Some(Slot::Idle(f)) => Some(f),
            None => None,
        };
        Some((Claim { receiving: self, id, left: None }, held))
    }

    /// How many files are in flight.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.files.lock().unwrap().len()
    }
}

/// Appends one chunk to its staging file under `root` (`NNNNNN.sst.part`);
/// the file's last chunk checks the hash of everything received against
/// the file's, syncs it and renames it to its final name, so a file under
/// that name is always complete and verified. Whether the replica may
/// receive at all is the caller's to check. Chunks of one file are taken
/// one at a time: a second one while the first is written is refused.
/// Blocking.
pub fn receive_chunk(root: &Path, receiving: &Receiving, c: &Chunk) -> Result<(), ChunkError> {
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
    let last = end == c.file_len;
    let expected = match (last, c.hash) {
        (true, Some(h)) => Some(h),
        (true, None) => return Err(ChunkError::Bounds(format!("the last chunk of file {} has no hash", c.file))),
        (false, _) => None,
    };
    let id = (c.group, c.op_id, c.attempt, c.file);
    let io = |e: io::Error| ChunkError::Io(e.to_string());
    let dir = attempt_dir(root, c.group, c.op_id, c.attempt);
    let path = file_path(&dir, c.file);
    let part = path.with_extension("sst.part");
    let Some((mut claim, held)) = receiving.claim(id) else {
        return Err(ChunkError::Order { file: c.file, got: c.offset, expected: c.offset.saturating_add(1) });
    };

    // Where the file stands: a new one, or one whose received part is
    // exactly what the hash in memory covers.
    let mut hash = if c.offset == 0 {
        if !dir.is_dir() {
            create_dir_synced(&dir, root).map_err(io)?;
        }
        File::create(&part).map_err(io)?;
        Xxh3::new()
    } else {
        let have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        match held {
            Some(f) if f.len == c.offset && have == c.offset => f.hash,
            // Out of order: the file goes on where it stands.
            Some(f) if f.len == have => {
                claim.left = Some((f.len, f.hash));
                return Err(ChunkError::Order { file: c.file, got: c.offset, expected: have });
            }
            // A restart (the hash is gone) or a file changed under us: it
            // starts over.
            _ => return Err(ChunkError::Order { file: c.file, got: c.offset, expected: 0 }),
        }
    };
    write_at(&part, c.offset, &c.data).map_err(io)?;
    // What the hash covers is what the file holds.
    let have = fs::metadata(&part).map_err(io)?.len();
    if have != end {
        let _ = fs::remove_file(&part);
        return Err(ChunkError::Io(format!("file {} has {have} bytes after a chunk ending at {end}", c.file)));
    }
    hash.update(&c.data);
    let Some(expected) = expected else {
        claim.left = Some((end, hash));
        return Ok(());
    };
    let got = hash.digest();
    if got != expected {
        let _ = fs::remove_file(&part);
        return Err(ChunkError::Checksum { op: c.op_id, file: c.file, got, expected });
    }
    File::open(&part).and_then(|f| f.sync_all()).map_err(io)?;
    fs::rename(&part, &path).map_err(io)?;
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io)
}

/// The alignment `O_DIRECT` needs of buffers, offsets and lengths.
const ALIGN: usize = 4096;

/// Whether `O_DIRECT` writes failed here once (a file system that takes
/// the flag at open but not the writes): from then on, buffered only.
static NO_DIRECT: AtomicBool = AtomicBool::new(false);

/// Writes `data` at `offset` of the file at `path` (which has exactly
/// `offset` bytes): the aligned part with `O_DIRECT` when the file system
/// takes it, the rest through the page cache.
fn write_at(path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
    let direct_len = if offset.is_multiple_of(ALIGN as u64) { data.len() / ALIGN * ALIGN } else { 0 };
    let mut done = 0;
    if direct_len > 0 && !NO_DIRECT.load(Ordering::Relaxed) {
        if let Some(f) = open_direct(path)? {
            match write_direct(&f, offset, &data[..direct_len]) {
                Ok(()) => done = direct_len,
                Err(e) if e.raw_os_error() == Some(EINVAL) => {
                    tracing::info!("O_DIRECT writes refused here ({e}): backfill files are written buffered");
                    NO_DIRECT.store(true, Ordering::Relaxed);
                    f.set_len(offset)?;
                }
                Err(e) => return Err(e),
            }
        }
    }
    if done < data.len() {
        let f = fs::OpenOptions::new().write(true).open(path)?;
        write_all_at(&f, &data[done..], offset + done as u64)?;
    }
    Ok(())
}

/// Writes `data` (a multiple of [`ALIGN`] long) at `offset` of a file
/// opened with `O_DIRECT`, from an aligned address: the chunk's own bytes
/// are used where the allocator put them on a page boundary, else copied.
fn write_direct(f: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    if data.as_ptr().align_offset(ALIGN) == 0 {
        return write_all_at(f, data, offset);
    }
    let mut buf = vec![0u8; data.len() + ALIGN];
    let at = buf.as_ptr().align_offset(ALIGN);
    let aligned = &mut buf[at..at + data.len()];
    aligned.copy_from_slice(data);
    write_all_at(f, aligned, offset)
}

#[cfg(unix)]
fn write_all_at(f: &File, data: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, data, offset)
}

#[cfg(not(unix))]
fn write_all_at(mut f: &File, data: &[u8], offset: u64) -> io::Result<()> {
    f.seek(io::SeekFrom::Start(offset))?;
    f.write_all(data)
}

#[cfg(target_os = "linux")]
const EINVAL: i32 = libc::EINVAL;
#[cfg(not(target_os = "linux"))]
const EINVAL: i32 = 22;

/// The file at `path` opened for writing with `O_DIRECT`, or `None` where
/// the file system refuses it (tmpfs, for one).
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> io::Result<Option<File>> {
    Ok(None)
}

/// Creates `dir` and its missing parents below `root`, and makes each
/// one's entry durable in its parent — also one another thread created and
/// may not have synced yet: a staged file is acknowledged only once a crash
/// cannot lose it. Called once per attempt directory (its files are then
/// synced into it one by one).
fn create_dir_synced(dir: &Path, root: &Path) -> io::Result<()> {
    if dir == root || !dir.starts_with(root) {
        // The root's own durability is the node's to see to, at its start.
        return fs::create_dir_all(dir);
    }
    let Some(parent) = dir.parent() else { return Ok(()) };
    create_dir_synced(parent, root)?;
    if let Err(e) = fs::create_dir(dir) {
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    File::open(parent)?.sync_all()
}

/// Removes the staged files of `group` once they can no longer be needed
/// (the backfill is recorded, or never will be here): best effort, a
/// leftover goes with the group's folder.
pub fn remove_staged(root: &Path, group: u64) {
    if let Err(e) = super::sst::remove_dir(&staging_dir(root, group)) {
        tracing::warn!(group, "removing staged backfill files: {e}");
    }
}

/// Links a file the source wrote on this node into the local replica's
/// staging directory (no copy, no network): the replica sits beside the
/// source. Blocking.
pub fn stage_local(root: &Path, group: u64, op: OpId, attempt: u64, n: u32, from: &Path) -> io::Result<()> {
    let dir = attempt_dir(root, group, op, attempt);
    if !dir.is_dir() {
        create_dir_synced(&dir, root)?;
    }
    let to: PathBuf = file_path(&dir, n);
    let _ = fs::remove_file(&to);
    if fs::hard_link(from, &to).is_err() {
        fs::copy(from, &to)?;
        File::open(&to)?.sync_all()?;
    }
    File::open(&dir)?.sync_all()
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::split::sst::SstFile;

    const GROUP: u64 = 9;
    const OP: OpId = 5;
    const ATTEMPT: u64 = 77;

    /// Sends the file at `path` as file `id` to a node whose staging root
    /// is `root`, in chunks of `size` bytes, as the forwarder does (the
    /// hash on the last chunk).
    pub fn send(
        root: &Path,
        receiving: &Receiving,
        (group, op_id, attempt, file): FileId,
        path: &Path,
        f: &SstFile,
        size: usize,
    ) -> Result<(), ChunkError> {
        let bytes = fs::read(path).unwrap();
        let n = bytes.len().div_ceil(size).max(1);
        for i in 0..n {
            let part = &bytes[(i * size).min(bytes.len())..((i + 1) * size).min(bytes.len())];
            let c = Chunk {
                group,
                replica_id: 1,
                op_id,
                attempt,
                file,
                offset: (i * size) as u64,
                file_len: f.len,
                hash: (i + 1 == n).then_some(f.hash),
                data: part.to_vec(),
            };
            receive_chunk(root, receiving, &c)?;
        }
        Ok(())
    }

    /// A file of `len` incompressible bytes under `dir`, and its description.
    fn file(dir: &Path, len: usize) -> (PathBuf, Vec<u8>, SstFile) {
        let mut seed = len as u64 | 1;
        let bytes = crate::testing::noise(&mut seed, len).into_bytes();
        let path = dir.join("src.bin");
        fs::write(&path, &bytes).unwrap();
        let f = SstFile { len: len as u64, hash: xxhash_rust::xxh3::xxh3_64(&bytes) };
        (path, bytes, f)
    }

    fn chunk(offset: usize, data: &[u8], f: &SstFile, last: bool) -> Chunk {
        Chunk {
            group: GROUP,
            replica_id: 1,
            op_id: OP,
            attempt: ATTEMPT,
            file: 0,
            offset: offset as u64,
            file_len: f.len,
            hash: last.then_some(f.hash),
            data: data.to_vec(),
        }
    }

    fn staged(root: &Path) -> PathBuf {
        file_path(&attempt_dir(root, GROUP, OP, ATTEMPT), 0)
    }

    #[test]
    fn aligned_and_unaligned_chunks_make_the_same_file() {
        // Aligned chunks go to disk with O_DIRECT (where the file system
        // takes it), an unaligned tail or offset through the page cache:
        // the staged file is byte for byte the one sent either way.
        let src = tempfile::tempdir().unwrap();
        let (path, bytes, f) = file(src.path(), 3 * ALIGN * 4 + 123);
        for size in [ALIGN * 4, ALIGN + 1, 1000, bytes.len()] {
            let root = tempfile::tempdir().unwrap();
            let receiving = Receiving::default();
            send(root.path(), &receiving, (GROUP, OP, ATTEMPT, 0), &path, &f, size).unwrap();
            assert_eq!(fs::read(staged(root.path())).unwrap(), bytes, "chunks of {size} bytes");
            assert_eq!(receiving.in_flight(), 0, "a complete file is no longer in flight");
        }
    }

    #[test]
    fn damaged_out_of_order_or_oversized_chunks_are_refused() {
        let src = tempfile::tempdir().unwrap();
        let (_, bytes, f) = file(src.path(), 3 * ALIGN + 10);
        let root = tempfile::tempdir().unwrap();
        let r = Receiving::default();
        // One flipped bit: refused by checksum, and the file is not kept.
        let mut bad = bytes.clone();
        bad[bytes.len() / 2] ^= 1;
        let err = receive_chunk(root.path(), &r, &chunk(0, &bad, &f, true)).unwrap_err();
        assert!(matches!(err, ChunkError::Checksum { file: 0, .. }), "{err}");
        assert!(!staged(root.path()).exists(), "a damaged file is removed");
        // Damage in an earlier chunk is found at the last one.
        let mut bad_start = bytes.clone();
        bad_start[10] ^= 1;
        receive_chunk(root.path(), &r, &chunk(0, &bad_start[..ALIGN], &f, false)).unwrap();
        let err = receive_chunk(root.path(), &r, &chunk(ALIGN, &bytes[ALIGN..], &f, true)).unwrap_err();
        assert!(matches!(err, ChunkError::Checksum { .. }), "{err}");
        // A gap: refused, and the file goes on where it stands.
        receive_chunk(root.path(), &r, &chunk(0, &bytes[..100], &f, false)).unwrap();
        let err = receive_chunk(root.path(), &r, &chunk(200, &bytes[200..300], &f, false)).unwrap_err();
        assert_eq!(err, ChunkError::Order { file: 0, got: 200, expected: 100 });
        receive_chunk(root.path(), &r, &chunk(100, &bytes[100..], &f, true)).unwrap();
        assert_eq!(fs::read(staged(root.path())).unwrap(), bytes);
        // The last chunk must carry the file's hash.
        let err = receive_chunk(root.path(), &r, &chunk(0, &bytes, &f, false)).unwrap_err();
        assert!(matches!(err, ChunkError::Bounds(_)), "{err}");
        // Bounds: past the file's end, an absurd file number or size.
        let past = receive_chunk(root.path(), &r, &chunk(bytes.len(), &[1], &f, true));
        assert!(matches!(past, Err(ChunkError::Bounds(_))));
        let mut c = chunk(0, &[], &f, false);
        c.file = MAX_FILES;
        assert!(matches!(receive_chunk(root.path(), &r, &c), Err(ChunkError::Bounds(_))));
        let mut c = chunk(u64::MAX as usize, &[1], &f, false);
        c.file_len = u64::MAX;
        assert!(matches!(receive_chunk(root.path(), &r, &c), Err(ChunkError::Bounds(_))));
    }

    #[test]
    fn a_receiver_that_restarted_mid_file_has_the_file_start_over() {
        let src = tempfile::tempdir().unwrap();
        let (_, bytes, f) = file(src.path(), 2 * ALIGN);
        let root = tempfile::tempdir().unwrap();
        receive_chunk(root.path(), &Receiving::default(), &chunk(0, &bytes[..ALIGN], &f, false)).unwrap();
        // The restarted node has the partial file but not its hash.
        let restarted = Receiving::default();
        let err = receive_chunk(root.path(), &restarted, &chunk(ALIGN, &bytes[ALIGN..], &f, true)).unwrap_err();
        assert_eq!(err, ChunkError::Order { file: 0, got: ALIGN as u64, expected: 0 });
        receive_chunk(root.path(), &restarted, &chunk(0, &bytes[..ALIGN], &f, false)).unwrap();
        receive_chunk(root.path(), &restarted, &chunk(ALIGN, &bytes[ALIGN..], &f, true)).unwrap();
        assert_eq!(fs::read(staged(root.path())).unwrap(), bytes);
    }

    #[test]
    fn a_file_is_under_its_name_only_once_complete_and_verified() {
        let src = tempfile::tempdir().unwrap();
        let (_, bytes, f) = file(src.path(), 2 * ALIGN);
        let root = tempfile::tempdir().unwrap();
        let r = Receiving::default();
        receive_chunk(root.path(), &r, &chunk(0, &bytes[..ALIGN], &f, false)).unwrap();
        assert!(!staged(root.path()).exists(), "half a file is not under the name ingestion reads");
        assert!(staged(root.path()).with_extension("sst.part").exists());
        receive_chunk(root.path(), &r, &chunk(ALIGN, &bytes[ALIGN..], &f, true)).unwrap();
        assert_eq!(fs::read(staged(root.path())).unwrap(), bytes);
        assert!(!staged(root.path()).with_extension("sst.part").exists());
        // A late first chunk of the same file starts a new part; the
        // verified file is untouched.
        receive_chunk(root.path(), &r, &chunk(0, &bytes[..ALIGN], &f, false)).unwrap();
        assert_eq!(fs::read(staged(root.path())).unwrap(), bytes);
    }

    #[test]
    fn chunks_of_one_file_are_taken_one_at_a_time() {
        let src = tempfile::tempdir().unwrap();
        let (_, bytes, f) = file(src.path(), 2 * ALIGN);
        let root = tempfile::tempdir().unwrap();
        let r = Receiving::default();
        let id = (GROUP, OP, ATTEMPT, 0);
        let (claim, _) = r.claim(id).expect("free");
        // Another chunk of the file while the first is being written.
        let err = receive_chunk(root.path(), &r, &chunk(0, &bytes[..ALIGN], &f, false)).unwrap_err();
        assert!(matches!(err, ChunkError::Order { .. }), "{err}");
        assert!(r.claim((GROUP, OP, ATTEMPT, 1)).is_some(), "other files are free");
        drop(claim);
        receive_chunk(root.path(), &r, &chunk(0, &bytes[..ALIGN], &f, false)).unwrap();
        receive_chunk(root.path(), &r, &chunk(ALIGN, &bytes[ALIGN..], &f, true)).unwrap();
        assert_eq!(fs::read(staged(root.path())).unwrap(), bytes);
    }

    #[test]
    fn files_in_flight_are_bounded() {
        let r = Receiving::default();
        for n in 0..(MOST_IN_FLIGHT as u32 * 2) {
            let (mut claim, _) = r.claim((GROUP, OP, ATTEMPT, n)).unwrap();
            claim.left = Some((1, Xxh3::new()));
        }
        assert!(r.in_flight() <= MOST_IN_FLIGHT, "{} in flight", r.in_flight());
    }

    #[test]
    fn attempts_are_staged_side_by_side_until_the_backfill_is_recorded() {
        // Two forwarders may overlap for a moment (a change of the source's
        // leader): the files of either may be the ones the log names.
        let root = tempfile::tempdir().unwrap();
        let r = Receiving::default();
        let data = b"x".to_vec();
        let f = SstFile { len: 1, hash: xxhash_rust::xxh3::xxh3_64(&data) };
        for attempt in [1, 2] {
            receive_chunk(root.path(), &r, &Chunk { attempt, ..chunk(0, &data, &f, true) }).unwrap();
        }
        for attempt in [1, 2] {
            assert!(file_path(&attempt_dir(root.path(), GROUP, OP, attempt), 0).exists());
        }
        remove_staged(root.path(), GROUP);
        assert!(!staging_dir(root.path(), GROUP).exists());
    }
}
