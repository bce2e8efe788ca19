//! Keys and values of the benchmark: names, which key an operation picks,
//! and the bytes written.
//!
//! Keys are YCSB-style `user%08d` (`user00000042`): fixed width, so their
//! byte order is their numeric order and "evenly spaced keys" are evenly
//! spaced numbers, which is what the split and multi-range scenarios rely
//! on. Values are random printable text (so compression cannot shrink the
//! data set), drawn from a small pool made once, so generating them costs
//! nothing per operation.

use clap::ValueEnum;
use rand::Rng;

use crate::zipfian::{ScrambledZipfian, THETA};

/// Length of every key (`user` + 8 digits).
pub const KEY_LEN: usize = 12;

/// The name of key number `i`.
pub fn key(i: u64) -> String {
    format!("user{i:08}")
}

/// Key popularity.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Distribution {
    /// Every key equally likely.
    Uniform,
    /// Zipfian (θ = 0.99), hot keys scattered over the key space (YCSB's default).
    Zipfian,
}

/// Picks key numbers in `[0, n)` from a distribution.
#[derive(Debug, Clone)]
pub enum KeyChooser {
    Uniform(u64),
    Zipfian(ScrambledZipfian),
}

impl KeyChooser {
    /// A chooser over `n ≥ 1` keys (the Zipfian one costs O(n) to build:
    /// build it once and clone it).
    pub fn new(dist: Distribution, n: u64) -> KeyChooser {
        match dist {
            Distribution::Uniform => KeyChooser::Uniform(n.max(1)),
            Distribution::Zipfian => KeyChooser::Zipfian(ScrambledZipfian::new(n.max(1), THETA)),
        }
    }

    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        match self {
            KeyChooser::Uniform(n) => rng.random_range(0..*n),
            KeyChooser::Zipfian(z) => z.item(rng.random::<f64>()),
        }
    }
}

/// A pool of random values of one size. For CleaveDB each is a JSON
/// string whose encoding (quotes included) is exactly `size` bytes; for
/// etcd the same text is used as raw bytes.
#[derive(Debug, Clone)]
pub struct Values {
    texts: Vec<String>,
}

impl Values {
    /// `count` random values of `size ≥ 2` bytes each.
    pub fn new(size: usize, count: usize, rng: &mut impl Rng) -> Values {
        let size = size.max(2);
        let texts = (0..count.max(1))
            .map(|_| {
                let body: String = (0..size - 2).map(|_| rng.sample(rand::distr::Alphanumeric) as char).collect();
                format!("\"{body}\"")
            })
            .collect();
        Values { texts }
    }

    /// One value as JSON text.
    pub fn pick(&self, rng: &mut impl Rng) -> &str {
        &self.texts[rng.random_range(0..self.texts.len())]
    }
}

/// How many keys of `value_size` bytes make `bytes` of data (key bytes
/// included, as the server counts a shard's size).
pub fn keys_for_bytes(bytes: u64, value_size: usize) -> u64 {
    let per_key = (KEY_LEN + value_size.max(2)) as u64;
    bytes.div_ceil(per_key).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn keys_sort_like_their_numbers() {
        assert_eq!(key(42), "user00000042");
        assert_eq!(key(42).len(), KEY_LEN);
        assert!(key(9) < key(10) && key(99_999) < key(100_000));
    }

    #[test]
    fn values_are_json_strings_of_the_requested_size() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let v = Values::new(100, 4, &mut rng);
        for _ in 0..10 {
            let t = v.pick(&mut rng);
            assert_eq!(t.len(), 100);
            let s: String = serde_json::from_str(t).unwrap();
            assert_eq!(s.len(), 98);
        }
        assert_eq!(Values::new(0, 1, &mut rng).pick(&mut rng), "\"\"");
    }

    #[test]
    fn choosers_stay_in_range() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for dist in [Distribution::Uniform, Distribution::Zipfian] {
            let c = KeyChooser::new(dist, 50);
            assert!((0..10_000).all(|_| c.next(&mut rng) < 50), "{dist:?}");
        }
    }

    #[test]
    fn fill_size_becomes_a_key_count() {
        assert_eq!(keys_for_bytes(20 << 20, 1024), (20u64 << 20).div_ceil(1036));
        assert_eq!(keys_for_bytes(0, 10), 1);
    }
}
