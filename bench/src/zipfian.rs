//! Zipfian key popularity, as YCSB generates it.
//!
//! In a Zipfian distribution the item of rank `i` (0-based) is chosen with
//! probability proportional to `1 / (i + 1)^θ`; with YCSB's θ = 0.99 a few
//! keys are very hot and most are cold, like real request streams. Drawing
//! from it naively needs a table of `n` cumulative weights; instead this is
//! the constant-time method of Gray et al., "Quickly Generating
//! Billion-Record Synthetic Databases" (SIGMOD 1994), the one YCSB's
//! `ZipfianGenerator` uses: after computing `ζ(n, θ) = Σ 1/i^θ` once, each
//! draw is one uniform number and a few floating-point operations. Ranks 0
//! and 1 are exact; higher ranks follow the distribution closely.
//!
//! Ranks are popularity, not keys: rank 0 would always be `user00000000`,
//! so every hot key would sit at the start of the key space, in one range.
//! [`ScrambledZipfian`] does what YCSB does by default and hashes the rank
//! (FNV-1a, 64-bit) onto the key space, scattering the hot keys.

/// YCSB's default skew.
pub const THETA: f64 = 0.99;

/// Draws ranks in `[0, n)` with Zipfian popularity (rank 0 the hottest).
#[derive(Debug, Clone)]
pub struct Zipfian {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipfian {
    /// A generator over `n ≥ 1` items with skew `0 < theta < 1`. Costs O(n)
    /// once, to compute ζ(n, θ).
    pub fn new(n: u64, theta: f64) -> Zipfian {
        assert!(n >= 1, "a Zipfian distribution needs at least one item");
        assert!(theta > 0.0 && theta < 1.0, "theta must be in (0, 1)");
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2, theta);
        let eta = if n > 1 { (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan) } else { 0.0 };
        Zipfian { n, theta, alpha: 1.0 / (1.0 - theta), zetan, eta }
    }

    /// Number of items.
    pub fn items(&self) -> u64 {
        self.n
    }

    /// The rank for a uniform sample `u` in `[0, 1)`.
    pub fn rank(&self, u: f64) -> u64 {
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.n - 1);
        }
        let r = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        r.min(self.n - 1)
    }

    /// The exact probability of rank `i` (for checks).
    #[cfg(test)]
    pub fn probability(&self, i: u64) -> f64 {
        1.0 / ((i + 1) as f64).powf(self.theta) / self.zetan
    }
}

/// ζ(n, θ) = Σ_{i=1..n} 1 / i^θ.
pub fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

/// Zipfian ranks hashed onto `[0, n)`, so hot items are spread out.
#[derive(Debug, Clone)]
pub struct ScrambledZipfian {
    inner: Zipfian,
}

impl ScrambledZipfian {
    pub fn new(n: u64, theta: f64) -> ScrambledZipfian {
        ScrambledZipfian { inner: Zipfian::new(n, theta) }
    }

    /// The item for a uniform sample `u` in `[0, 1)`.
    pub fn item(&self, u: f64) -> u64 {
        fnv1a64(self.inner.rank(u)) % self.inner.items()
    }
}

/// FNV-1a, 64-bit, over the little-endian bytes of `v` (as YCSB's `fnvhash64`).
pub fn fnv1a64(v: u64) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    v.to_le_bytes().iter().fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn histogram(n: u64, draws: usize, f: impl Fn(f64) -> u64) -> Vec<u64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = vec![0u64; n as usize];
        for _ in 0..draws {
            counts[f(rng.random::<f64>()) as usize] += 1;
        }
        counts
    }

    #[test]
    fn zeta_matches_small_sums() {
        assert!((zeta(1, THETA) - 1.0).abs() < 1e-12);
        assert!((zeta(2, 0.5) - (1.0 + 1.0 / 2f64.sqrt())).abs() < 1e-12);
    }

    #[test]
    fn ranks_stay_in_range_at_the_extremes() {
        for n in [1, 2, 3, 10, 1000] {
            let z = Zipfian::new(n, THETA);
            for u in [0.0, 1e-9, 0.3, 0.5, 0.999_999, 0.999_999_999_9] {
                assert!(z.rank(u) < n, "n={n} u={u}");
            }
        }
        assert_eq!(Zipfian::new(1, THETA).rank(0.99), 0);
    }

    #[test]
    fn frequencies_follow_the_distribution() {
        let n = 1000;
        let draws = 400_000;
        let z = Zipfian::new(n, THETA);
        let counts = histogram(n, draws, |u| z.rank(u));
        let freq = |i: usize| counts[i] as f64 / draws as f64;
        // Ranks 0 and 1 are exact: within 5% of their probability.
        for i in [0, 1] {
            let (got, want) = (freq(i), z.probability(i as u64));
            assert!((got - want).abs() / want < 0.05, "rank {i}: {got} vs {want}");
        }
        // The hottest tenth of the items gets the share ζ(100)/ζ(1000), about 69%.
        let top: f64 = (0..100).map(freq).sum();
        let want = zeta(100, THETA) / zeta(n, THETA);
        assert!((top - want).abs() < 0.03, "top 10%: {top} vs {want}");
        // Popularity falls with rank.
        assert!(freq(0) > freq(1) && freq(1) > freq(10) && freq(10) > freq(500));
    }

    #[test]
    fn scrambling_spreads_hot_items_but_keeps_the_skew() {
        let n = 1000;
        let draws = 200_000;
        let s = ScrambledZipfian::new(n, THETA);
        let counts = histogram(n, draws, |u| s.item(u));
        let mut sorted = counts.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        // Still skewed: the hottest item gets about 1/ζ(1000) ≈ 13% of draws.
        assert!(sorted[0] as f64 / draws as f64 > 0.10, "{}", sorted[0]);
        // But the hottest items are not bunched at the start of the key space.
        let hottest: Vec<usize> = {
            let mut idx: Vec<usize> = (0..n as usize).collect();
            idx.sort_unstable_by_key(|i| std::cmp::Reverse(counts[*i]));
            idx.truncate(10);
            idx
        };
        assert!(hottest.iter().any(|i| *i >= 100), "{hottest:?}");
        assert_ne!(fnv1a64(0), fnv1a64(1));
    }
}
