//! Hash-spread keyspaces: the keys under a prefix spread over n buckets.
//!
//! Sequential keys (timestamps, counters) all land at the end of one range,
//! and splitting cannot help: the new right half takes every new write
//! again. A keyspace declared over a prefix puts each key under it in one
//! of `n` buckets by a hash of the key, and each bucket is its own range of
//! the directory (`docs/plans/merge.md`, part 2).
//!
//! The bucket is in the key the directory routes and the shard stores — the
//! **internal key** — and nowhere else: users read and write plain keys.
//! The internal key of `k = prefix · rest` is `prefix · B(b) · rest`, where
//! `b = xxh3(k) mod n` and `B(b)` is the code point `U+F0000 + b` (the
//! supplementary private use area: keys are UTF-8 strings, and code points
//! order as their UTF-8 bytes do). So bucket `b`'s keys are exactly
//! `[prefix · B(b), prefix · B(b+1))`, the buckets tile
//! `[prefix · B(0), prefix · B(n))`, and within a bucket internal keys
//! sort as their user keys do. A user key whose first character after the
//! prefix is itself in that area cannot be told apart, and is refused.
//!
//! This module is the pure part: the mapping both ways and the buckets'
//! bounds. Routing, scans (a k-way merge of the buckets) and the admin
//! endpoint use it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The first bucket marker's code point.
const MARK_BASE: u32 = 0xF0000;
/// At most this many buckets (and at least two).
pub const MAX_BUCKETS: u32 = 256;

/// Why a keyspace or a key under one is refused.
#[derive(thiserror::Error, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum KeyspaceError {
    #[error("hash_buckets must be 2 to {MAX_BUCKETS}, got {0}")]
    BadBuckets(u32),
    #[error("a keyspace prefix must not be empty")]
    EmptyPrefix,
    #[error("prefix {prefix:?} overlaps keyspace {other:?}")]
    Overlaps { prefix: String, other: String },
    #[error("key {0:?} has a private-use character (U+F0000..U+F00FF) right after its keyspace's prefix")]
    ReservedKey(String),
}

/// A declared keyspace.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keyspace {
    pub buckets: u32,
    /// Its buckets are ranges of their own and nothing was left under a
    /// plain key: the declaration is over. Keys are mapped from the
    /// declaration on, active or not (see the plan's fence).
    pub active: bool,
}

/// The declared keyspaces, by prefix.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Keyspaces(pub BTreeMap<String, Keyspace>);

impl Keyspaces {
    /// Whether `prefix` with `buckets` may be declared beside the others
    /// (the same declaration again is allowed: it changes nothing).
    pub fn check_new(&self, prefix: &str, buckets: u32) -> Result<(), KeyspaceError> {
        if prefix.is_empty() {
            return Err(KeyspaceError::EmptyPrefix);
        }
        if !(2..=MAX_BUCKETS).contains(&buckets) {
            return Err(KeyspaceError::BadBuckets(buckets));
        }
        for (other, k) in &self.0 {
            let same = other == prefix && k.buckets == buckets;
            if !same && (other.starts_with(prefix) || prefix.starts_with(other.as_str())) {
                return Err(KeyspaceError::Overlaps { prefix: prefix.to_string(), other: other.clone() });
            }
        }
        Ok(())
    }

    /// The keyspace `key` is under: `(prefix, buckets)`.
    pub fn of(&self, key: &str) -> Option<(&str, u32)> {
        // The prefixes never overlap: the greatest one at or below the key
        // is the only candidate.
        let upto = (std::ops::Bound::Unbounded, std::ops::Bound::Included(key));
        let (prefix, k) = self.0.range::<str, _>(upto).next_back()?;
        key.starts_with(prefix.as_str()).then_some((prefix.as_str(), k.buckets))
    }

    /// The internal key of user key `key` (itself when under no keyspace).
    pub fn to_internal(&self, key: &str) -> Result<String, KeyspaceError> {
        let Some((prefix, n)) = self.of(key) else { return Ok(key.to_string()) };
        let rest = &key[prefix.len()..];
        if rest.chars().next().is_some_and(is_mark) {
            return Err(KeyspaceError::ReservedKey(key.to_string()));
        }
        let mut internal = String::with_capacity(key.len() + 4);
        internal.push_str(prefix);
        internal.push(mark(bucket(key, n)));
        internal.push_str(rest);
        Ok(internal)
    }

    /// The user key of internal key `internal` (the inverse of
    /// [`Keyspaces::to_internal`]).
    pub fn to_user(&self, internal: &str) -> String {
        if let Some((prefix, _)) = self.of(internal) {
            let rest = &internal[prefix.len()..];
            let mut chars = rest.chars();
            if chars.next().is_some_and(is_mark) {
                return format!("{prefix}{}", chars.as_str());
            }
        }
        internal.to_string()
    }
}

impl Keyspaces {
    /// The keyspace whose boundary `right_start` (the first key of a
    /// range, whose left neighbour starts at `_left_start`) is: its prefix
    /// or a bucket's bound (the last bound is the end of its buckets).
    /// Merging across it would put two buckets (or a bucket and keys
    /// outside them) in one range.
    pub fn bound_at(&self, _left_start: &str, right_start: &str) -> Option<&str> {
        self.0.iter().find_map(|(prefix, k)| {
            let bound = right_start == prefix || bucket_bounds(prefix, k.buckets).iter().any(|b| b == right_start);
            bound.then_some(prefix.as_str())
        })
    }
}

/// The bucket of user key `key` among `n`.
pub fn bucket(key: &str, n: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % u64::from(n)) as u32
}

/// Bucket `b`'s marker character.
fn mark(b: u32) -> char {
    char::from_u32(MARK_BASE + b).expect("a private-use code point")
}

fn is_mark(c: char) -> bool {
    (MARK_BASE..MARK_BASE + MAX_BUCKETS).contains(&u32::from(c))
}

/// Where each of keyspace `prefix`'s `n` buckets starts, and where the
/// last ends: `n + 1` internal keys, in order. The directory splits at
/// each of them (the first separates the buckets from plain keys under the
/// prefix that sort before them: there are none, since every key under
/// the prefix is in a bucket, but the bound keeps each range one bucket).
pub fn bucket_bounds(prefix: &str, n: u32) -> Vec<String> {
    (0..=n).map(|b| format!("{prefix}{}", mark(b))).collect()
}

/// The internal keys `[from, to)` of bucket `b` of keyspace `prefix` that
/// hold the user keys in `[start, end)`, or `None` when none can: a scan of
/// the keyspace reads this in each bucket and merges them in key order.
pub fn bucket_span(prefix: &str, b: u32, start: &str, end: Option<&str>) -> Option<(String, String)> {
    let at = |rest: &str| format!("{prefix}{}{rest}", mark(b));
    let from = match start.strip_prefix(prefix) {
        Some(rest) => at(rest),
        None if start < prefix => at(""),
        None => return None, // past every key under the prefix
    };
    let to = match end {
        None => format!("{prefix}{}", mark(b + 1)),
        Some(e) => match e.strip_prefix(prefix) {
            Some(rest) => at(rest),
            None if e < prefix => return None, // before every key under it
            None => format!("{prefix}{}", mark(b + 1)),
        },
    };
    (from < to).then_some((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spaces() -> Keyspaces {
        let mut k = Keyspaces::default();
        k.0.insert("ev/".into(), Keyspace { buckets: 8, active: true });
        k.0.insert("log/".into(), Keyspace { buckets: 2, active: false });
        k
    }

    #[test]
    fn declarations_are_checked() {
        let k = spaces();
        assert_eq!(k.check_new("", 4), Err(KeyspaceError::EmptyPrefix));
        assert_eq!(k.check_new("x/", 1), Err(KeyspaceError::BadBuckets(1)));
        assert_eq!(k.check_new("x/", 257), Err(KeyspaceError::BadBuckets(257)));
        assert!(matches!(k.check_new("ev/a", 4), Err(KeyspaceError::Overlaps { .. })), "inside another");
        assert!(matches!(k.check_new("e", 4), Err(KeyspaceError::Overlaps { .. })), "around another");
        assert!(matches!(k.check_new("ev/", 4), Err(KeyspaceError::Overlaps { .. })), "redeclared otherwise");
        assert_eq!(k.check_new("ev/", 8), Ok(()), "the same again");
        assert_eq!(k.check_new("evx/", 8), Ok(()));
    }

    #[test]
    fn keys_outside_every_keyspace_are_their_own_internal_keys() {
        let k = spaces();
        for key in ["", "a", "ev", "evx/1", "lo", "zzz"] {
            assert_eq!(k.to_internal(key).unwrap(), key);
            assert_eq!(k.to_user(key), key);
        }
    }

    #[test]
    fn a_key_starting_with_a_bucket_marker_is_refused() {
        let k = spaces();
        let key = format!("ev/{}x", mark(3));
        assert_eq!(k.to_internal(&key), Err(KeyspaceError::ReservedKey(key.clone())));
    }

    #[test]
    fn sequential_keys_spread_over_the_buckets() {
        let k = spaces();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..1_000 {
            let internal = k.to_internal(&format!("ev/{i:08}")).unwrap();
            let b = u32::from(internal["ev/".len()..].chars().next().unwrap()) - MARK_BASE;
            seen.insert(b);
        }
        assert_eq!(seen.len(), 8, "every bucket takes some");
    }

    proptest! {
        #[test]
        fn internal_keys_map_back_and_fall_in_their_buckets_range(rest in "[a-z0-9/]{0,12}") {
            let k = spaces();
            let key = format!("ev/{rest}");
            let internal = k.to_internal(&key).unwrap();
            prop_assert_eq!(k.to_user(&internal), key.clone());
            let b = bucket(&key, 8);
            let bounds = bucket_bounds("ev/", 8);
            prop_assert!(bounds[b as usize] <= internal && internal < bounds[b as usize + 1]);
            let (from, to) = bucket_span("ev/", b, "ev/", None).unwrap();
            prop_assert!(from <= internal && internal < to);
            let (from, to) = bucket_span("ev/", b, "a", Some("f")).unwrap();
            prop_assert!(from <= internal && internal < to, "a span around the whole prefix");
        }

        #[test]
        fn within_a_bucket_internal_keys_order_as_user_keys(a in "[a-z]{0,6}", b in "[a-z]{0,6}") {
            let (ia, ib) = (format!("ev/{}{a}", mark(2)), format!("ev/{}{b}", mark(2)));
            prop_assert_eq!(ia.cmp(&ib), a.cmp(&b));
        }

        #[test]
        fn a_bucket_span_holds_exactly_the_bucket_keys_of_a_user_range(
            rest in "[a-z]{0,4}", s in "(ev/)?[a-z]{0,3}", e in "(ev/)?[a-z]{0,3}"
        ) {
            let (start, end) = if s <= e { (s, e) } else { (e, s) };
            let k = spaces();
            let key = format!("ev/{rest}");
            let b = bucket(&key, 8);
            let internal = k.to_internal(&key).unwrap();
            let in_span = bucket_span("ev/", b, &start, Some(&end)).is_some_and(|(f, t)| f <= internal && internal < t);
            prop_assert_eq!(in_span, key >= start && key < end, "{} in [{}, {})", key, start, end);
        }
    }
}
