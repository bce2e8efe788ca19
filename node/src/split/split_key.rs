//! Where to split a range: a key near the middle of its data.
//!
//! Finding the middle must not cost a read of the whole range. Counting a
//! gigabyte's keys and then walking to the middle read it twice, and on a
//! 2-core box that stalled the range's writes for over a second before the
//! split had even begun. So a large range's middle comes from RocksDB's
//! metadata alone ([`middle_by_files`]): the boundaries of the table files
//! inside the range are the candidate keys, RocksDB's approximate size of
//! `[start, candidate)` (read from the files' indexes, not their data) says
//! how much lies before each, and the candidate nearest half the range's
//! size wins — TiKV finds its split keys from per-file properties the same
//! way. The split key is the first live key from there on.
//!
//! A small range, or one whose files do not cut it anywhere near the middle
//! (most of it still in memtables, or one big file), is scanned once
//! ([`median_by_scan`]), keeping a bounded, evenly spaced sample of its live
//! keys: the median by count, exact for ranges of up to twice the sample.

use crate::kv;
use crate::storage::{self, data_key, user_key_of, Db, ValueRecord};

/// A range at least this large (by RocksDB's estimate of its table files)
/// is cut by file boundaries, without reading its data.
pub const BY_FILES_MIN_BYTES: u64 = 64 << 20;

/// Boundaries tried, and records read from each for a live key.
const MAX_TRIES: usize = 8;
const MAX_WALK: usize = 10_000;

/// Live keys kept while scanning: the scan's median is exact up to twice
/// this many keys, and within `count / SAMPLE` places beyond.
const SAMPLE: usize = 4096;

/// A live key near the middle of `[start, end)` of `group`, strictly after
/// `start`: by size from file boundaries when the range holds at least
/// `by_files_min` bytes in table files, else by count. Blocking.
pub fn split_key(
    db: &Db,
    group: u64,
    start: &str,
    end: Option<&str>,
    by_files_min: u64,
) -> Result<Option<String>, rocksdb::Error> {
    if let Some(key) = middle_by_files(db, group, start, end, by_files_min)? {
        return Ok(Some(key));
    }
    Ok(median_by_scan(db, group, start, end)?.filter(|k| k.as_str() > start))
}

/// The first live key at or after a table-file boundary near the middle of
/// the range by size, or `None` (too small, no boundary between a quarter
/// and three quarters of it, or only tombstones after the nearest ones).
pub fn middle_by_files(
    db: &Db,
    group: u64,
    start: &str,
    end: Option<&str>,
    min_bytes: u64,
) -> Result<Option<String>, rocksdb::Error> {
    let lo = data_key(group, start.as_bytes());
    let hi = match end {
        Some(e) => data_key(group, e.as_bytes()),
        None => kv::user_data_end(group),
    };
    let cf = storage::cf(db, storage::CF_DATA);
    let total = db.get_approximate_sizes_cf(cf, &[rocksdb::Range::new(&lo, &hi)])[0];
    if total < min_bytes.max(1) {
        return Ok(None);
    }
    let mut candidates: Vec<Vec<u8>> = db
        .live_files()?
        .into_iter()
        .filter(|f| f.column_family_name == storage::CF_DATA)
        .flat_map(|f| [f.start_key, f.end_key])
        .flatten()
        .filter(|k| *k > lo && *k < hi)
        .collect();
    candidates.sort_unstable();
    candidates.dedup();
    let ranges: Vec<rocksdb::Range> = candidates.iter().map(|c| rocksdb::Range::new(&lo, c)).collect();
    let sizes = db.get_approximate_sizes_cf(cf, &ranges);
    // Boundaries between a quarter and three quarters of the range, nearest
    // the middle first; from each, a bounded walk to a live key (a run of
    // tombstones, which count in file sizes, moves on to the next one).
    let (half, quarter) = (total / 2, total / 4);
    let mut near: Vec<(u64, &Vec<u8>)> = candidates
        .iter()
        .zip(sizes)
        .filter(|(_, before)| (quarter..=total - quarter).contains(before))
        .map(|(c, before)| (before.abs_diff(half), c))
        .collect();
    near.sort_unstable();
    for (_, boundary) in near.into_iter().take(MAX_TRIES) {
        // Boundaries are keys of this group's user data (between `lo` and
        // `hi`), so they are the UTF-8 keys clients wrote.
        let Ok(from) = std::str::from_utf8(user_key_of(boundary)) else { continue };
        for item in kv::records(db, None, group, from, end).take(MAX_WALK) {
            let (k, v) = item?;
            if live(&v) {
                return Ok(Some(String::from_utf8_lossy(user_key_of(&k)).into_owned()));
            }
        }
    }
    Ok(None)
}

/// The live key in the middle of `[start, end)` by count, in one pass that
/// keeps at most `2 * SAMPLE` keys: every `stride`-th live key, the stride
/// doubling (and every other kept key dropped) whenever the sample fills.
pub fn median_by_scan(db: &Db, group: u64, start: &str, end: Option<&str>) -> Result<Option<String>, rocksdb::Error> {
    let mut sample: Vec<Vec<u8>> = Vec::new();
    let (mut stride, mut count) = (1usize, 0usize);
    for item in kv::records(db, None, group, start, end) {
        let (k, v) = item?;
        if !live(&v) {
            continue;
        }
        if count.is_multiple_of(stride) {
            sample.push(user_key_of(&k).to_vec());
            if sample.len() == 2 * SAMPLE {
                // sample[j] is live key number j * stride: keep the even j.
                sample = sample.into_iter().step_by(2).collect();
                stride *= 2;
            }
        }
        count += 1;
    }
    Ok(sample.get(count / 2 / stride).map(|k| String::from_utf8_lossy(k).into_owned()))
}

/// Whether a stored record is a live value (not a tombstone).
fn live(stored: &[u8]) -> bool {
    ValueRecord::decode(stored).is_some_and(|r| !r.tombstone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{KvCommand, KvOp};
    use crate::testing::{put, temp_db, whole_shard};

    #[test]
    fn the_scan_counts_live_keys_only_and_is_exact_for_small_ranges() {
        let (_d, db) = temp_db();
        let mut s = whole_shard();
        for (i, k) in ["a", "b", "c", "d", "e", "f"].iter().enumerate() {
            put(&db, &mut s, i as u64 + 1, k, "1").unwrap();
        }
        let del = KvCommand { range_id: 1, epoch: 1, op: KvOp::Delete { key: "a".into(), if_version: None } };
        let mut b = kv::ApplyBatch::default();
        kv::apply(&db, 1, 7, &mut s, &mut b, &del).unwrap().unwrap();
        db.write(b.write).unwrap();
        // Live: b c d e f → the third.
        assert_eq!(median_by_scan(&db, 1, "", None).unwrap().as_deref(), Some("d"));
        assert_eq!(median_by_scan(&db, 1, "e", None).unwrap().as_deref(), Some("f"));
        assert_eq!(median_by_scan(&db, 1, "g", None).unwrap(), None);
        // The split key is never the range's start.
        assert_eq!(split_key(&db, 1, "e", None, BY_FILES_MIN_BYTES).unwrap().as_deref(), Some("f"));
        assert_eq!(split_key(&db, 1, "f", None, BY_FILES_MIN_BYTES).unwrap(), None);
    }

    #[test]
    fn a_long_scan_keeps_a_bounded_sample_and_lands_near_the_middle() {
        let (_d, db) = temp_db();
        let mut s = whole_shard();
        let n = 5 * SAMPLE + 123;
        for i in 0..n {
            put(&db, &mut s, i as u64 + 1, &format!("k{i:06}"), "1").unwrap();
        }
        let got = median_by_scan(&db, 1, "", None).unwrap().unwrap();
        let at: usize = got[1..].parse().unwrap();
        // The stride after doubling past 2 * SAMPLE keys: within one stride.
        assert!(at.abs_diff(n / 2) <= 4, "median {at} of {n} keys");
    }

    #[test]
    fn a_large_range_is_cut_at_a_file_boundary_by_size_not_by_count() {
        let (_d, db) = temp_db();
        let mut s = whole_shard();
        let cf = storage::cf(&db, storage::CF_DATA);
        let (mut index, mut seed) = (0, crate::testing::NOISE_SEED);
        let mut write = |s: &mut kv::ShardState, prefix: &str, keys: usize, value_len: usize| {
            let value = format!("\"{}\"", crate::testing::noise(&mut seed, value_len));
            for i in 0..keys {
                index += 1;
                put(&db, s, index, &format!("{prefix}{i:04}"), &value).unwrap();
            }
            db.flush_cf(cf).unwrap(); // one table file per call
        };
        // Many small keys, then two files of a few large ones: by count the
        // middle is among the "a" keys, by size between the "m"s and "x"s.
        write(&mut s, "a", 1000, 1);
        write(&mut s, "m", 20, 50_000);
        write(&mut s, "x", 20, 50_000);
        assert_eq!(median_by_scan(&db, 1, "", None).unwrap().unwrap().chars().next(), Some('a'));
        let by_size = split_key(&db, 1, "", None, 1).unwrap().unwrap();
        assert!(by_size == "m0019" || by_size == "x0000", "cut at {by_size}");
        // Too small for the files to be asked: the scan decides.
        let by_count = split_key(&db, 1, "", None, 1 << 40).unwrap().unwrap();
        assert!(by_count.starts_with('a'), "{by_count}");
        // A part of the range no file boundary cuts near its middle.
        assert_eq!(middle_by_files(&db, 1, "m0005", Some("m0015"), 1).unwrap(), None);
    }

    #[test]
    fn a_boundary_followed_only_by_tombstones_gives_way_to_the_next_nearest() {
        let (_d, db) = temp_db();
        let cf = storage::cf(&db, storage::CF_DATA);
        let mut seed = crate::testing::NOISE_SEED;
        let value = format!("\"{}\"", crate::testing::noise(&mut seed, 50_000));
        // Records written as they are stored (not through apply, whose
        // change log would lie in the same files, past the user keys).
        let store = |key: String, r: ValueRecord| db.put_cf(cf, data_key(1, key.as_bytes()), r.encode()).unwrap();
        for prefix in ["a", "m"] {
            for i in 0..20 {
                store(format!("{prefix}{i:04}"), ValueRecord::live(1, value.as_bytes().to_vec()));
            }
            db.flush_cf(cf).unwrap();
        }
        // Every "m" key deleted: the files still hold their old values, so
        // the boundary at "m0000" is the middle by size, but nothing after
        // it is live.
        for i in 0..20 {
            store(format!("m{i:04}"), ValueRecord::deleted(2));
        }
        db.flush_cf(cf).unwrap();
        assert_eq!(middle_by_files(&db, 1, "", None, 1).unwrap().as_deref(), Some("a0019"));
    }
}
