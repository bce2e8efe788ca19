//! The content digest used to verify a split before cutover.
//!
//! The digest of a set of records is the wrapping sum of a 64-bit hash of
//! each `(key, record)`. A sum is order-independent and can be updated in
//! O(1) when one record replaces another (subtract the old hash, add the
//! new), so both sides keep it current as they apply writes instead of
//! scanning the range while writes are frozen.

use crate::storage::ValueRecord;

/// Hash of one stored record under its key; 0 for a vacant record (one
/// that is not stored: the key is absent, see [`ValueRecord::is_vacant`]).
pub fn record_hash(key: &str, record: &ValueRecord) -> u64 {
    if record.is_vacant() {
        return 0;
    }
    stored_hash(key, &record.encode())
}

/// [`record_hash`] of a record as stored (`encoded`: what
/// [`ValueRecord::encode`] gave; a copy that reads stored records hashes
/// their bytes as they are, without decoding and encoding them again).
pub fn stored_hash(key: &str, encoded: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key.as_bytes());
    h.update(encoded);
    h.digest()
}

/// The digest change when `old` (if any) is replaced by `new`.
pub fn delta(key: &str, old: Option<&ValueRecord>, new: &ValueRecord) -> u64 {
    record_hash(key, new).wrapping_sub(old.map_or(0, |o| record_hash(key, o)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: u64, json: &str) -> ValueRecord {
        ValueRecord::live(v, json.as_bytes().to_vec())
    }

    #[test]
    fn incremental_updates_match_a_full_recount_in_any_order() {
        // Two replicas reach the same final content through different orders.
        let final_set = [("a", rec(3, "1")), ("b", rec(1, "2")), ("c", rec(2, "\"x\""))];
        let full = final_set.iter().fold(0u64, |d, (k, r)| d.wrapping_add(record_hash(k, r)));
        // Replica 1: a@1, a@2, a@3, b@1, c@1, c@2
        let mut d1 = 0u64;
        d1 = d1.wrapping_add(delta("a", None, &rec(1, "0")));
        d1 = d1.wrapping_add(delta("a", Some(&rec(1, "0")), &rec(2, "5")));
        d1 = d1.wrapping_add(delta("a", Some(&rec(2, "5")), &rec(3, "1")));
        d1 = d1.wrapping_add(delta("b", None, &rec(1, "2")));
        d1 = d1.wrapping_add(delta("c", None, &rec(1, "\"y\"")));
        d1 = d1.wrapping_add(delta("c", Some(&rec(1, "\"y\"")), &rec(2, "\"x\"")));
        // Replica 2: c@2 first, then b, then a@3.
        let d2 = [("c", rec(2, "\"x\"")), ("b", rec(1, "2")), ("a", rec(3, "1"))]
            .iter()
            .fold(0u64, |d, (k, r)| d.wrapping_add(delta(k, None, r)));
        assert_eq!(d1, full);
        assert_eq!(d2, full);
        // Any difference in a value or version shows.
        assert_ne!(full, full.wrapping_add(delta("b", Some(&rec(1, "2")), &rec(1, "3"))));
    }
}
