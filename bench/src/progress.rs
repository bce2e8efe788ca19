//! Progress while the benchmark runs: a line with the elapsed time, the
//! throughput of the last second and the errors so far (plus whatever a
//! scenario adds, such as the split's phase), and progress bars for
//! preloading. Drawn on stderr with indicatif when it is a terminal; when it
//! is not (a CI log), a plain line is printed every few seconds instead.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::runner::Clock;
use crate::stats::Live;

/// Seconds between two plain lines when stderr is not a terminal.
const PLAIN_EVERY: u64 = 5;

/// A bar with a count and a rate, for preloading `len` items.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let template = format!("{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}} ({{per_sec}}, eta {{eta}}) {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The running line; stops when dropped.
pub struct Ticker {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl Ticker {
    /// Starts updating every second from `live` counters; `note` is
    /// appended to the line (a scenario may change it at any time).
    pub fn start(clock: Arc<Clock>, total: Option<Duration>, live: Arc<Live>, note: Arc<Mutex<String>>) -> Ticker {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        let plain = bar.is_hidden();
        let line = bar.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = (Instant::now(), 0u64);
            loop {
                tick.tick().await;
                let (ops, errors) = live.read();
                let now = Instant::now();
                let rate = (ops - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
                last = (now, ops);
                let elapsed = now.duration_since(clock.start).as_secs();
                let phase = if now < clock.measure_from { "warmup" } else { "run" };
                let of = total.map(|t| format!("/{}s", t.as_secs())).unwrap_or_default();
                let note = note.lock().map(|n| n.clone()).unwrap_or_default();
                let msg = format!("[{elapsed:>4}s{of}] {phase}: {rate:>8.0} ops/s, {errors} errors {note}");
                if plain {
                    if elapsed.is_multiple_of(PLAIN_EVERY) {
                        eprintln!("{}", msg.trim_end());
                    }
                } else {
                    line.set_message(msg);
                }
            }
        });
        Ticker { bar, task }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}
