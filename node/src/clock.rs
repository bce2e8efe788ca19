//! A hybrid logical clock: the timestamps a watch's cursors will be made of
//! (see `docs/plans/watch.md`; nothing stamps writes with it yet).
//!
//! A timestamp is one `u64`: wall-clock milliseconds in the high 48 bits, a
//! logical counter in the low 16. [`Clock::now`] never goes back and never
//! repeats, even when the wall clock steps back or many timestamps are
//! taken in one millisecond (the counter takes over, and the next
//! millisecond resets it). [`Clock::observe`] moves the clock past a
//! timestamp seen from another node, so that an event caused by one seen
//! elsewhere gets a later timestamp whatever the skew between the two
//! machines' clocks — what makes per-key order hold across nodes.
//!
//! Kept free of I/O but for reading the system time, and tested on its own
//! with a wall clock given by the test.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A hybrid logical timestamp.
pub type Ts = u64;

/// Bits of the logical counter.
const LOGICAL_BITS: u32 = 16;

/// The timestamp of wall-clock millisecond `ms` with a zero counter.
pub fn from_wall_ms(ms: u64) -> Ts {
    ms << LOGICAL_BITS
}

/// The wall-clock milliseconds of `ts`.
pub fn wall_ms(ts: Ts) -> u64 {
    ts >> LOGICAL_BITS
}

/// A node's clock (shared: every method takes `&self`).
#[derive(Debug, Default)]
pub struct Clock {
    last: AtomicU64,
}

impl Clock {
    pub fn new() -> Clock {
        Clock::default()
    }

    /// A new timestamp, later than every one this clock gave or observed.
    pub fn now(&self) -> Ts {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.now_at(ms)
    }

    /// [`Clock::now`] with the wall clock reading `wall_ms`.
    pub fn now_at(&self, wall_ms: u64) -> Ts {
        let physical = from_wall_ms(wall_ms);
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = physical.max(last.saturating_add(1));
            match self.last.compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Moves the clock to at least `ts` (a timestamp from elsewhere).
    pub fn observe(&self, ts: Ts) {
        self.last.fetch_max(ts, Ordering::AcqRel);
    }

    /// The latest timestamp given or observed, without taking a new one.
    pub fn peek(&self) -> Ts {
        self.last.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_wall_clock_and_counts_within_a_millisecond() {
        let c = Clock::new();
        let a = c.now_at(1_000);
        assert_eq!(a, from_wall_ms(1_000));
        let b = c.now_at(1_000);
        assert_eq!(b, a + 1, "the same millisecond: the counter");
        let d = c.now_at(1_001);
        assert_eq!(d, from_wall_ms(1_001), "a new millisecond resets the counter");
        assert_eq!(wall_ms(d), 1_001);
    }

    #[test]
    fn never_goes_back_when_the_wall_clock_does() {
        let c = Clock::new();
        let a = c.now_at(5_000);
        let b = c.now_at(4_000);
        assert!(b > a && wall_ms(b) == 5_000, "stepped back: stays at the latest millisecond");
    }

    #[test]
    fn an_observed_timestamp_from_a_clock_ahead_is_passed() {
        let (here, there) = (Clock::new(), Clock::new());
        let remote = there.now_at(9_000);
        here.observe(remote);
        let next = here.now_at(2_000);
        assert!(next > remote, "caused by the remote event, so later than it");
        here.observe(from_wall_ms(1));
        assert_eq!(here.peek(), next, "an older timestamp changes nothing");
    }

    #[test]
    fn timestamps_are_unique_across_threads() {
        let c = std::sync::Arc::new(Clock::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..10_000).map(|_| c.now_at(7)).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<Ts> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "no timestamp given twice");
    }
}
