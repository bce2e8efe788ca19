//! The operations supervisor: while this node is the (confirmed) metadata
//! leader, one task per unfinished operation walks it through its phases.
//!
//! A task loops: read the operation from the directory, do the work of its
//! phase ([`super::split::step`] or [`super::moves::step`], each idempotent),
//! and let the step record the next phase with a compare-and-set entry.
//! The task ends when the operation is finished or this node stops leading;
//! a new metadata leader starts the loop again for every operation that is
//! not finished, from the phase the directory records.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cleave_metadata::{MetaCommand, MetaResponse, OpId, OpKind, Operation, Phase};

use crate::node::Node;
use crate::rpc::ExecError;

/// Wall-clock milliseconds, as operations record them in the directory.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The operations this node is driving.
#[derive(Default)]
pub struct Supervisor {
    running: Mutex<HashSet<OpId>>,
}

impl Supervisor {
    /// Takes `op` on, unless a task already drives it.
    fn claim(&self, op: OpId) -> bool {
        self.running.lock().unwrap().insert(op)
    }

    fn release(&self, op: OpId) {
        self.running.lock().unwrap().remove(&op);
    }
}

/// While this node leads the metadata group, drives every active operation.
pub async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if !node.meta_leader().confirmed().await {
            continue;
        }
        let ops: Vec<OpId> = node.directory().active_ops().map(|o| o.op_id).collect();
        for op in ops {
            if !node.supervisor().claim(op) {
                continue;
            }
            let node = node.clone();
            tokio::spawn(async move {
                drive(&node, op).await;
                node.supervisor().release(op);
            });
        }
    }
}

/// What a driver remembers between steps of one operation.
pub(super) struct Pace {
    /// When the step last did a periodic action (a split's progress report
    /// or freeze re-send, a move's catch-up progress): steps pace
    /// themselves with it.
    pub last_report: Instant,
    /// The phase, and since when the work in it last moved on (a split's
    /// capture: the backfill's bytes, the forward log shipped), with the
    /// furthest it was seen to get.
    pub phase: Phase,
    pub moved_at: Instant,
    pub best: (bool, u64, u64),
    /// The backfill attempt seen last, and how many were seen in the phase.
    pub attempt: u64,
    pub attempts: u32,
    /// Since when the split's backfill was seen done in this phase (the
    /// forward log's catch-up has run since).
    pub catching_up_since: Option<Instant>,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            last_report: Instant::now(),
            phase: Phase::Planned,
            moved_at: Instant::now(),
            best: (false, 0, 0),
            attempt: 0,
            attempts: 0,
            catching_up_since: None,
        }
    }

    /// Notes the phase the operation is in (a new one starts the clock).
    pub fn enter(&mut self, phase: Phase) {
        if self.phase != phase {
            (self.phase, self.moved_at, self.best) = (phase, Instant::now(), (false, 0, 0));
            (self.attempt, self.attempts, self.catching_up_since) = (0, 0, None);
        }
    }

    /// Notes the backfill attempt under way (0: none). A new one starts
    /// its copy figures from zero, so the furthest point is kept per
    /// attempt; the number of attempts is bounded on its own.
    pub fn attempt(&mut self, attempt: u64) {
        if attempt != 0 && attempt != self.attempt {
            (self.attempt, self.attempts) = (attempt, self.attempts + 1);
            (self.moved_at, self.best) = (Instant::now(), (self.best.0, 0, self.best.2));
        }
    }

    /// Notes how far the work got; getting further than ever before
    /// restarts the clock. Only further counts: a copy that starts over
    /// after each failure, and fails at the same place, is not progress.
    /// Answers whether it did.
    pub fn saw(&mut self, now: (bool, u64, u64)) -> bool {
        let best = self.best;
        let further = (now.0 && !best.0) || now.1 > best.1 || now.2 > best.2;
        if further {
            self.moved_at = Instant::now();
            self.best = (best.0 || now.0, best.1.max(now.1), best.2.max(now.2));
        }
        further
    }
}

async fn drive(node: &Arc<Node>, op_id: OpId) {
    let mut pace = Pace::new();
    let mut failures = 0u32;
    loop {
        if !node.meta_leader().confirmed().await {
            return;
        }
        let Some(op) = node.directory().ops.get(&op_id).cloned() else { return };
        if op.phase == Phase::Done || (op.phase == Phase::Aborted && op.cleaned) {
            return;
        }
        let stepped = match &op.kind {
            OpKind::Split { .. } | OpKind::Merge { .. } => super::split::step(node, &op, &mut pace).await,
            OpKind::Move { .. } => super::moves::step(node, &op, &mut pace.last_report).await,
        };
        match stepped {
            Ok(true) => failures = 0,
            Ok(false) => {
                tokio::time::sleep(Duration::from_millis(if op.phase == Phase::Frozen { 1 } else { 20 })).await
            }
            Err(e) => {
                failures += 1;
                tracing::debug!(op = op_id, kind = op.kind.name(), phase = ?op.phase, "step failed: {e}");
                // While frozen, writes wait on every retry: back off
                // little (the freeze deadline bounds the whole phase).
                let (step, most) = if op.phase == Phase::Frozen { (5, 20) } else { (20, 500) };
                tokio::time::sleep(Duration::from_millis((step * failures as u64).min(most))).await;
            }
        }
    }
}

/// Proposes `cmd` to the metadata group (this node leads it).
pub(crate) async fn meta(node: &Node, cmd: MetaCommand) -> Result<MetaResponse, ExecError> {
    node.router().propose_meta(cmd, 0).await
}

/// Records that `op` moved from its current phase to `to` (compare-and-set).
pub(crate) async fn advance(node: &Node, op: &Operation, to: Phase) -> Result<(), ExecError> {
    meta(node, MetaCommand::AdvanceOp { op_id: op.op_id, from: op.phase, to, now_ms: now_ms() }).await?;
    Ok(())
}

/// Records that `op` is abandoned, for `reason`. `learner_only`: the driver
/// of a move just saw the group outside any joint configuration with the
/// new replica only a learner (the only case in which a move in `Joint`
/// may be abandoned).
pub(crate) async fn abort(node: &Node, op: &Operation, reason: &str, learner_only: bool) -> Result<bool, ExecError> {
    tracing::warn!(op = op.op_id, kind = op.kind.name(), phase = ?op.phase, "aborting: {reason}");
    let cmd = MetaCommand::AbortOp { op_id: op.op_id, reason: reason.to_string(), now_ms: now_ms(), learner_only };
    meta(node, cmd).await?;
    let counter = match op.kind {
        OpKind::Split { .. } => "cleave_splits_aborted_total",
        OpKind::Merge { .. } => "cleave_merges_aborted_total",
        OpKind::Move { .. } => "cleave_moves_aborted_total",
    };
    metrics::counter!(counter).increment(1);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_getting_further_than_ever_counts_as_progress() {
        let mut p = Pace::new();
        p.enter(Phase::Capturing);
        assert!(!p.saw((false, 0, 0)), "nothing done yet");
        assert!(p.saw((false, 100, 0)));
        // A copy that starts over and fails at the same place again.
        assert!(!p.saw((false, 0, 0)));
        assert!(!p.saw((false, 100, 0)), "starting over is not progress");
        assert!(p.saw((false, 100, 5)), "the forward log shipped further");
        assert!(p.saw((true, 0, 5)), "the backfill done (a new forwarder knows no copy figures)");
        assert!(!p.saw((true, 100, 5)));
        // A new backfill attempt copies from zero again: progress within it
        // counts, and the attempts are counted.
        let mut p = Pace::new();
        p.enter(Phase::Capturing);
        p.attempt(7);
        assert!(p.saw((false, 100, 0)));
        p.attempt(7);
        assert!(!p.saw((false, 100, 0)));
        p.attempt(8);
        assert!(p.saw((false, 50, 0)), "the retry moves on");
        p.attempt(0);
        assert_eq!(p.attempts, 2, "no attempt (0) is not one");
        // A new phase starts the clock and the record afresh.
        p.enter(Phase::Frozen);
        assert_eq!(p.best, (false, 0, 0));
    }
}
