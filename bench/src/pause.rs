//! What writers saw of a split: pauses and throughput, computed from the
//! completion times of every successful write.
//!
//! The server reports its own `write_pause_ms` (freeze to activation, as the
//! split driver measured it). The client's view is what matters to users,
//! and it is measured independently here: with writers running all the
//! time, the **longest gap between two consecutive successful writes**
//! (across all writers) bounds how long the database accepted no write at
//! all, and the **largest single-write latency** is the longest any one
//! user waited. Throughput is counted in windows: before the split was
//! requested, while it ran, and after it finished. Pure functions over
//! sorted [`Completion`]s.

use serde::Serialize;

use crate::stats::Completion;

/// The interval between two consecutive successful writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Gap {
    /// When the earlier write answered, µs from the start of the run.
    pub from_us: u64,
    /// When the next write answered.
    pub to_us: u64,
}

impl Gap {
    pub fn len_us(&self) -> u64 {
        self.to_us - self.from_us
    }
}

/// The longest gap between consecutive completions among those that touch
/// `[from_us, to_us]` (the gap ends at or after `from_us` and starts at or
/// before `to_us`). `sorted` must be in time order.
pub fn longest_gap(sorted: &[Completion], from_us: u64, to_us: u64) -> Option<Gap> {
    sorted
        .windows(2)
        .map(|w| Gap { from_us: w[0].at_us, to_us: w[1].at_us })
        .filter(|g| g.to_us >= from_us && g.from_us <= to_us)
        .max_by_key(|g| (g.len_us(), std::cmp::Reverse(g.from_us)))
}

/// The slowest write that answered within `[from_us, to_us)`.
pub fn slowest(sorted: &[Completion], from_us: u64, to_us: u64) -> Option<Completion> {
    window(sorted, from_us, to_us).iter().copied().max_by_key(|c| (c.latency_us, std::cmp::Reverse(c.at_us)))
}

/// Writes per second that answered within `[from_us, to_us)`.
pub fn rate(sorted: &[Completion], from_us: u64, to_us: u64) -> f64 {
    if to_us <= from_us {
        return 0.0;
    }
    window(sorted, from_us, to_us).len() as f64 / ((to_us - from_us) as f64 / 1e6)
}

/// Writes answered in each consecutive `bucket_us` from 0 to `until_us`.
pub fn timeline(sorted: &[Completion], bucket_us: u64, until_us: u64) -> Vec<u64> {
    let buckets = until_us.div_ceil(bucket_us.max(1)) as usize;
    let mut out = vec![0u64; buckets];
    for c in window(sorted, 0, until_us) {
        out[(c.at_us / bucket_us.max(1)) as usize] += 1;
    }
    out
}

/// The completions answered within `[from_us, to_us)`.
fn window(sorted: &[Completion], from_us: u64, to_us: u64) -> &[Completion] {
    let lo = sorted.partition_point(|c| c.at_us < from_us);
    let hi = sorted.partition_point(|c| c.at_us < to_us);
    &sorted[lo..hi.max(lo)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(times: &[u64]) -> Vec<Completion> {
        times.iter().map(|&t| Completion { at_us: t, latency_us: t / 10 }).collect()
    }

    #[test]
    fn the_longest_gap_is_found_and_can_be_windowed() {
        let c = at(&[0, 10, 20, 500, 510, 520, 700, 705]);
        assert_eq!(longest_gap(&c, 0, u64::MAX), Some(Gap { from_us: 20, to_us: 500 }));
        assert_eq!(longest_gap(&c, 0, u64::MAX).unwrap().len_us(), 480);
        // only gaps touching [505, 800]: 500→510, 510→520, 520→700, 700→705
        assert_eq!(longest_gap(&c, 505, 800), Some(Gap { from_us: 520, to_us: 700 }));
        // a gap that spans the whole window still counts
        assert_eq!(longest_gap(&c, 100, 200), Some(Gap { from_us: 20, to_us: 500 }));
        assert_eq!(longest_gap(&at(&[5]), 0, 10), None);
        assert_eq!(longest_gap(&[], 0, 10), None);
    }

    #[test]
    fn equal_gaps_report_the_first() {
        let c = at(&[0, 10, 20, 30]);
        assert_eq!(longest_gap(&c, 0, 100), Some(Gap { from_us: 0, to_us: 10 }));
    }

    #[test]
    fn throughput_and_slowest_write_per_window() {
        // 1000 writes in the first second, 10 in the next, 500 in the third
        let mut times: Vec<u64> = (0..1000).map(|i| i * 1000).collect();
        times.extend((0..10).map(|i| 1_000_000 + i * 100_000));
        times.extend((0..500).map(|i| 2_000_000 + i * 2000));
        let c = at(&times);
        assert_eq!(rate(&c, 0, 1_000_000), 1000.0);
        assert_eq!(rate(&c, 1_000_000, 2_000_000), 10.0);
        assert_eq!(rate(&c, 2_000_000, 3_000_000), 500.0);
        assert_eq!(rate(&c, 5, 5), 0.0);
        assert_eq!(timeline(&c, 1_000_000, 3_000_000), [1000, 10, 500]);
        assert_eq!(timeline(&c, 1_000_000, 2_500_000), [1000, 10, 250]);
        let s = slowest(&c, 1_000_000, 2_000_000).unwrap();
        assert_eq!(s.at_us, 1_900_000);
        assert_eq!(slowest(&c, 10_000_000, 20_000_000), None);
    }
}
