//! Following a running operation, or a node's decommission, until it ends,
//! with a progress bar.
//!
//! The server copies a split's keys in the `capturing` phase, and a move's
//! new replica catches up in the `learning` phase, reporting `bytes_copied`
//! of `bytes_total`; the bar shows that, with the phase as its message. A
//! decommission's bar counts the node's replicas moved away. The bar is
//! drawn on stderr only when stderr is a terminal (indicatif hides itself
//! otherwise); then each change is printed as a plain line instead, so logs
//! of scripted runs still tell the story.
//!
//! Following has no deadline of its own. Ctrl-C stops following (clearing
//! the bar) with [`Interrupted`]; what was followed goes on in the cluster.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result};
use cleave_client::{Client, NodeId, NodeStatus, OpId, OperationView, Phase};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::nodes::{decommission_message, Drain};
use crate::operations::progress_message;

/// How often an operation is polled.
const POLL: Duration = Duration::from_millis(200);
/// How often the node list is polled while a node is decommissioned.
const NODE_POLL: Duration = Duration::from_secs(1);
/// How often the bar is redrawn (its spinner and clock move).
const TICK: Duration = Duration::from_millis(120);

/// The user pressed Ctrl-C while something was followed.
#[derive(Debug, thiserror::Error)]
#[error("stopped following {what}; it goes on in the cluster (see {see})")]
pub struct Interrupted {
    pub what: String,
    pub see: String,
}

/// Polls operation `id` until it is done or aborted; returns its last view.
/// With `quiet`, draws and prints nothing.
pub async fn follow(client: &Client, id: OpId, quiet: bool) -> Result<OperationView> {
    let bar = progress_bar("{spinner} op {prefix} [{bar:30}] {bytes}/{total_bytes} {msg} ({elapsed})", id)?;
    let plain = show(&bar, quiet);
    let mut last_phase: Option<Phase> = None;
    let followed = client.follow_operation(id, POLL, |v| {
        bar.set_message(progress_message(v));
        let p = &v.op.progress;
        if p.bytes_total > 0 {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_copied.min(p.bytes_total));
        }
        if plain && last_phase != Some(v.op.phase) {
            eprintln!("op {id}: {}", progress_message(v));
        }
        last_phase = Some(v.op.phase);
    });
    let interrupted = || Interrupted { what: format!("operation {id}"), see: format!("cleave ops {id}") };
    let result = until_ctrl_c(followed, interrupted).await;
    bar.finish_and_clear();
    result?.with_context(|| format!("cannot follow operation {id}"))
}

/// Polls the node list until the node whose row was `started` (when its
/// decommission started) is removed; returns its last row. The bar counts
/// its replicas moved away. With `quiet`, draws and prints nothing.
pub async fn follow_decommission(client: &Client, started: &NodeStatus, quiet: bool) -> Result<NodeStatus> {
    let node: NodeId = started.id;
    let bar = progress_bar("{spinner} node {prefix} [{bar:30}] {pos}/{len} replicas moved, {msg} ({elapsed})", node)?;
    let mut drain = Drain::default();
    let mut last_message = decommission_message(started);
    let (len, pos) = drain.update(started);
    bar.set_length(len);
    bar.set_position(pos);
    bar.set_message(last_message.clone());
    let plain = show(&bar, quiet);
    let followed = client.follow_decommission(node, NODE_POLL, |n| {
        let message = decommission_message(n);
        if plain && message != last_message {
            eprintln!("node {node}: {message}");
        }
        bar.set_message(message.clone());
        last_message = message;
        let (len, pos) = drain.update(n);
        bar.set_length(len);
        bar.set_position(pos);
    });
    let interrupted = || Interrupted { what: format!("the decommission of node {node}"), see: "cleave status".into() };
    let result = until_ctrl_c(followed, interrupted).await;
    bar.finish_and_clear();
    result?.with_context(|| format!("cannot follow the decommission of node {node}"))
}

/// A progress bar, hidden until [`show`] (so that it is first drawn with
/// the figures the caller sets).
fn progress_bar(template: &str, prefix: u64) -> Result<ProgressBar> {
    let bar = ProgressBar::hidden();
    let style = ProgressStyle::with_template(template).context("progress bar template")?.progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(prefix.to_string());
    Ok(bar)
}

/// Draws `bar` on stderr (unless `quiet`), redrawn every [`TICK`]. Returns
/// whether to print plain lines instead: stderr is not a terminal, so the
/// bar stays hidden.
fn show(bar: &ProgressBar, quiet: bool) -> bool {
    if quiet {
        return false;
    }
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar.enable_steady_tick(TICK);
    bar.is_hidden()
}

/// Runs `fut` to its end, or until Ctrl-C, which gives [`Interrupted`].
/// (If Ctrl-C cannot be listened for, it keeps its default effect.)
async fn until_ctrl_c<T>(fut: impl Future<Output = T>, interrupted: impl FnOnce() -> Interrupted) -> Result<T> {
    tokio::pin!(fut);
    tokio::select! {
        r = &mut fut => Ok(r),
        signal = tokio::signal::ctrl_c() => match signal {
            Ok(()) => Err(interrupted().into()),
            Err(_) => Ok(fut.await),
        },
    }
}
