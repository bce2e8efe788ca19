//! Following a running operation until it ends, with a progress bar.
//!
//! The server copies a split's keys in the `capturing` phase and reports
//! `bytes_copied` of `bytes_total`; the bar shows that, with the phase as
//! its message. It is drawn on stderr only when stderr is a terminal
//! (indicatif hides itself otherwise); then each phase change is printed as
//! a plain line instead, so logs of scripted runs still tell the story.

use std::time::Duration;

use anyhow::{Context, Result};
use cleave_client::{Client, OpId, OperationView, Phase};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::operations::progress_message;

/// How often the operation is polled.
const POLL: Duration = Duration::from_millis(200);

/// Polls operation `id` until it is done or aborted; returns its last view.
/// With `quiet`, draws and prints nothing.
pub async fn follow(client: &Client, id: OpId, quiet: bool) -> Result<OperationView> {
    let bar =
        if quiet { ProgressBar::hidden() } else { ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()) };
    let style =
        ProgressStyle::with_template("{spinner} op {prefix} [{bar:30}] {bytes}/{total_bytes} {msg} ({elapsed})")
            .context("progress bar template")?
            .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(id.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    let plain = !quiet && bar.is_hidden();
    let mut last_phase: Option<Phase> = None;
    let result = client
        .follow_operation(id, POLL, |v| {
            let p = &v.op.progress;
            if p.bytes_total > 0 {
                bar.set_length(p.bytes_total);
                bar.set_position(p.bytes_copied.min(p.bytes_total));
            }
            bar.set_message(progress_message(v));
            if plain && last_phase != Some(v.op.phase) {
                eprintln!("op {id}: {}", progress_message(v));
            }
            last_phase = Some(v.op.phase);
        })
        .await;
    bar.finish_and_clear();
    result.with_context(|| format!("cannot follow operation {id}"))
}
