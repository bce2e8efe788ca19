//! Open-loop pacing (`--rate`): when each request is due.
//!
//! A closed-loop benchmark (each worker sends its next request when the
//! previous one returns) slows down exactly when the system does, so a
//! one-second stall delays one request per worker and the stall hardly shows
//! in the percentiles: *coordinated omission*. In open-loop mode requests
//! are due at fixed times whatever happens, `rate` per second in total, and
//! latency is measured from when a request was *due*, not from when it was
//! finally sent. A stall then shows up as what users would see: every
//! request due during it waits.
//!
//! The `rate` is shared by the workers: worker `w` of `W` sends request `k`
//! at `(w + k·W) / rate` seconds after the start, so together they send
//! evenly every `1/rate` seconds. A worker that falls behind sends at once,
//! back to back, until it has caught up.

use std::time::Duration;

/// The due times of one worker's requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Seconds between two requests of this worker.
    interval: f64,
    /// Seconds from the start to this worker's first request.
    offset: f64,
}

impl Schedule {
    /// Worker `worker` (0-based) of `workers` sharing `rate > 0` requests per second.
    pub fn for_worker(rate: f64, worker: usize, workers: usize) -> Schedule {
        let workers = workers.max(1) as f64;
        Schedule { interval: workers / rate, offset: worker as f64 / rate }
    }

    /// When request `k` (0-based) is due, measured from the start.
    pub fn due(&self, k: u64) -> Duration {
        Duration::from_secs_f64(self.offset + k as f64 * self.interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_together_send_evenly_at_the_rate() {
        let (rate, workers) = (1000.0, 8);
        let mut due: Vec<Duration> = (0..workers)
            .flat_map(|w| {
                let s = Schedule::for_worker(rate, w, workers);
                (0..125).map(move |k| s.due(k))
            })
            .collect();
        due.sort();
        assert_eq!(due.len(), 1000);
        for (i, d) in due.iter().enumerate() {
            let want = i as f64 / rate;
            assert!((d.as_secs_f64() - want).abs() < 1e-9, "{i}: {d:?}");
        }
    }

    #[test]
    fn one_worker_alone_keeps_the_whole_rate() {
        let s = Schedule::for_worker(50.0, 0, 1);
        assert_eq!(s.due(0), Duration::ZERO);
        assert_eq!(s.due(50), Duration::from_secs(1));
    }
}
