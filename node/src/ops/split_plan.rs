//! What a live split should do next: the split's record in the directory
//! and what was just observed of its two shards in, the next action out.
//! Pure, like the move planner ([`super::move_plan`]), so every rule is
//! tested on its own; [`super::split`] observes, asks, and carries it out.
//!
//! The phases (see `docs/split-protocol.md`):
//! - `Planned`: create the new shard's replicas; `Created`: begin the
//!   capture at the source. Both are abandoned after [`SETUP_TIMEOUT`].
//! - `Capturing`: the source's leader backfills and forwards; once the
//!   backfill is done and the target lags by at most [`FREEZE_BACKLOG`]
//!   forward-log entries, freeze. Progress is reported on the way. A
//!   capture that stands still longer than the stall limit is abandoned.
//! - `Frozen`: writes to the moving range are refused; once the target has
//!   applied the whole forward log, compare the digests: equal → commit,
//!   different → abort. A freeze the source has not shown is sent again
//!   (at most every [`FREEZE_RESEND`]); after [`FREEZE_TIMEOUT`] the split
//!   is abandoned, so writes are never held for long.
//! - `Committed`: cut over (source drops the range, target activates it);
//!   `Aborted`: end the capture and delete the new shard.

use std::time::Duration;

use cleave_metadata::{Operation, Phase, Progress};

use crate::kv::Incoming;
use crate::rpc::ForwardStatus;

/// How far the target may lag behind when the source freezes: a distance
/// in source log indexes (newest forward-log entry less the last shipped).
pub const FREEZE_BACKLOG: u64 = 64;
/// How long creating the new shard may take before the split is abandoned.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a freeze may go unseen at the source before it is sent again.
pub const FREEZE_RESEND: Duration = Duration::from_millis(250);
/// How long writes may stay frozen before the split is abandoned.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// Backfill attempts (each a new copy from a new snapshot, after a failed
/// one) before the split is abandoned.
pub const MAX_BACKFILL_ATTEMPTS: u32 = 8;
/// How long the forward log's catch-up may try to get the target within
/// [`FREEZE_BACKLOG`] before the source freezes after any round that
/// shipped all it found.
pub const CATCH_UP_PATIENCE: Duration = Duration::from_secs(2);
/// How often progress is reported while capturing.
pub const REPORT_EVERY: Duration = Duration::from_millis(500);

/// What was observed for the decision.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Wall-clock now, in the directory's milliseconds.
    pub now_ms: u64,
    /// A test's hold of the current phase (`--fault-hold`), 0 if none.
    pub hold_ms: u64,
    /// Since the last progress report or freeze re-send.
    pub since_report: Duration,
    /// Since the capture last moved on (bytes backfilled, forward log
    /// shipped) or, until the source answers, since it began.
    pub stalled_for: Duration,
    /// How long a capture may stand still before the split is abandoned
    /// (`--split-stall-timeout-ms`; zero: never).
    pub stall_limit: Duration,
    /// Backfill attempts seen in this phase (by this driver).
    pub attempts: u32,
    /// How long the forward log's catch-up has run (since the backfill was
    /// first seen done in this phase).
    pub catching_up_for: Duration,
    /// The source leader's forwarding status (`Capturing`, `Frozen`).
    pub source: Option<ForwardStatus>,
    /// The target's receiving state (`Frozen`), once looked at.
    pub target: Option<Incoming>,
}

/// The next action of a split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do yet; look again shortly.
    Wait,
    /// Give the split up.
    Abort(String),
    /// `Planned`: create the new shard's replicas, then record `Created`.
    CreateTarget,
    /// `Created`: begin the capture at the source, then record `Capturing`.
    BeginCapture,
    /// `Capturing`: record progress, and (`freeze`) freeze the source and
    /// record `Frozen`.
    Capture { report: Option<Progress>, freeze: bool },
    /// `Capturing` or `Frozen`: the source's status is needed first.
    ObserveSource,
    /// `Frozen`: send the freeze to the source again.
    ResendFreeze,
    /// `Frozen`: the target's receiving state is needed (or was behind:
    /// look at its leader).
    ObserveTarget,
    /// `Frozen`: the digests match; commit the split.
    Commit,
    /// `Committed`: cut over and finish.
    Cutover,
    /// `Aborted`: end the capture, delete the new shard, mark cleaned.
    Cleanup,
}

/// The next action for `op` given what was observed.
pub fn next(op: &Operation, obs: &Observed) -> Step {
    let in_phase_ms = obs.now_ms.saturating_sub(op.entered(op.phase).unwrap_or(0));
    if obs.hold_ms > 0 && in_phase_ms < obs.hold_ms {
        return Step::Wait;
    }
    if matches!(op.phase, Phase::Planned | Phase::Created) && in_phase_ms > SETUP_TIMEOUT.as_millis() as u64 {
        return Step::Abort("the new shard's replicas could not be set up in time".into());
    }
    match op.phase {
        Phase::Planned => Step::CreateTarget,
        Phase::Created => Step::BeginCapture,
        Phase::Capturing => {
            // A capture that stands still (a target its files never reach,
            // a forwarder that cannot start) would keep the range busy for
            // good: give it up, as a user's cancel would.
            if !obs.stall_limit.is_zero() && obs.stalled_for > obs.stall_limit {
                return Step::Abort(format!("the capture made no progress for {} s", obs.stalled_for.as_secs()));
            }
            let Some(st) = &obs.source else { return Step::ObserveSource };
            if !st.backfill_done && obs.attempts > MAX_BACKFILL_ATTEMPTS {
                return Step::Abort(format!("the backfill failed {} times", obs.attempts - 1));
            }
            // Freeze once the target is close; under writes too fast for
            // that (each round ships what came during the last one), once a
            // round has drained what it found and the catch-up has had its
            // time — the tail is then one round's writes.
            let close = st.last_seq.saturating_sub(st.shipped) <= FREEZE_BACKLOG;
            let patience = st.drained && obs.catching_up_for >= CATCH_UP_PATIENCE;
            let freeze = st.backfill_done && (close || patience);
            let report = (freeze || obs.since_report > REPORT_EVERY).then(|| progress(&op.progress, st));
            if report.is_none() && !freeze {
                return Step::Wait;
            }
            Step::Capture { report, freeze }
        }
        Phase::Frozen => frozen(op, obs, in_phase_ms),
        Phase::Committed => Step::Cutover,
        Phase::Aborted if op.cleaned => Step::Wait,
        Phase::Aborted => Step::Cleanup,
        Phase::Done | Phase::Learning | Phase::Joint => Step::Wait,
    }
}

fn frozen(op: &Operation, obs: &Observed, frozen_for_ms: u64) -> Step {
    if frozen_for_ms > FREEZE_TIMEOUT.as_millis() as u64 {
        return Step::Abort("freeze timed out before the target caught up".into());
    }
    let Some(st) = &obs.source else { return Step::ObserveSource };
    if st.frozen_at.is_none() {
        // The freeze was recorded but may not have reached the source (a
        // failed send): send it again (idempotent) rather than wait out the
        // freeze deadline — not at every poll, though (the forwarder reports
        // the freeze only after its next round), so as not to load the
        // paused shard's log.
        let resend = frozen_for_ms > FREEZE_RESEND.as_millis() as u64 && obs.since_report > FREEZE_RESEND;
        return if resend { Step::ResendFreeze } else { Step::Wait };
    }
    if let Some(why) = &st.mismatch {
        return Step::Abort(why.clone());
    }
    let Some(source_digest) = st.digest else { return Step::Wait };
    // Any replica of the target that has applied the forward log up to the
    // last entry proves the target's log holds it.
    let Some(inc) = obs.target.as_ref().filter(|i| i.watermark >= st.last_seq) else {
        return Step::ObserveTarget;
    };
    if inc.op_id != op.op_id {
        return Step::Abort(format!("the target receives for operation {}, not {}", inc.op_id, op.op_id));
    }
    if inc.digest != source_digest {
        return Step::Abort(format!("digest mismatch: source {source_digest:x}, target {:x}", inc.digest));
    }
    Step::Commit
}

/// What is left of the freeze deadline, and a little over (for the planner
/// to see it passed), when `op` is frozen; `None` otherwise. The driver
/// bounds its calls in `Frozen` with it.
pub fn frozen_budget(op: &Operation, now_ms: u64) -> Option<Duration> {
    let frozen_at = op.entered(Phase::Frozen).filter(|_| op.phase == Phase::Frozen)?;
    let left = FREEZE_TIMEOUT.saturating_sub(Duration::from_millis(now_ms.saturating_sub(frozen_at)));
    Some(left + Duration::from_millis(20))
}

/// The copy figures to record: the source's, never going backwards (a
/// forwarder restarted after the backfill knows no copy figures).
pub fn progress(old: &Progress, st: &ForwardStatus) -> Progress {
    let fresh = st.bytes_copied >= old.bytes_copied;
    let pick = |new: u64, old: u64| if fresh { new.max(old) } else { old };
    Progress {
        keys_copied: pick(st.keys_copied, old.keys_copied),
        bytes_copied: pick(st.bytes_copied, old.bytes_copied),
        keys_total: pick(st.keys_total, old.keys_total),
        bytes_total: pick(st.bytes_total, old.bytes_total),
        forward_backlog: st.last_seq.saturating_sub(st.shipped),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleave_metadata::OpKind;

    fn op(phase: Phase, entered_ms: u64) -> Operation {
        Operation {
            op_id: 7,
            kind: OpKind::Split {
                range_id: 1,
                split_key: "m".into(),
                source: 1,
                target: 2,
                new_range_id: 2,
                target_replicas: vec![],
                reason: "admin".into(),
            },
            phase,
            history: if phase == Phase::Planned {
                vec![(phase, entered_ms)]
            } else {
                vec![(Phase::Planned, 0), (phase, entered_ms)]
            },
            progress: Progress::default(),
            write_pause_ms: None,
            error: None,
            cleaned: false,
        }
    }

    fn at(now_ms: u64) -> Observed {
        Observed { now_ms, ..Default::default() }
    }

    fn status(backfill_done: bool, last_seq: u64, shipped: u64) -> ForwardStatus {
        ForwardStatus { backfill_done, last_seq, shipped, ..Default::default() }
    }

    fn incoming(op_id: u64, watermark: u64, digest: u64) -> Incoming {
        Incoming { watermark, digest, ..Incoming::new(op_id, "m".into(), None) }
    }

    #[test]
    fn calls_while_frozen_are_bounded_by_what_is_left_of_the_freeze_deadline() {
        let margin = Duration::from_millis(20);
        assert_eq!(frozen_budget(&op(Phase::Frozen, 1000), 1000), Some(FREEZE_TIMEOUT + margin));
        assert_eq!(
            frozen_budget(&op(Phase::Frozen, 1000), 4000),
            Some(FREEZE_TIMEOUT - Duration::from_secs(3) + margin)
        );
        assert_eq!(frozen_budget(&op(Phase::Frozen, 1000), 60_000), Some(margin), "past the deadline: just the margin");
        assert_eq!(frozen_budget(&op(Phase::Frozen, 5000), 1000), Some(FREEZE_TIMEOUT + margin), "a clock behind");
        for phase in [Phase::Capturing, Phase::Committed, Phase::Planned] {
            assert_eq!(frozen_budget(&op(phase, 1000), 4000), None, "{phase:?}: not bounded");
        }
    }

    #[test]
    fn setup_phases_create_then_capture_and_are_abandoned_after_the_deadline() {
        assert_eq!(next(&op(Phase::Planned, 1000), &at(2000)), Step::CreateTarget);
        assert_eq!(next(&op(Phase::Created, 1000), &at(2000)), Step::BeginCapture);
        let late = 1000 + SETUP_TIMEOUT.as_millis() as u64 + 1;
        assert!(matches!(next(&op(Phase::Planned, 1000), &at(late)), Step::Abort(_)));
        assert!(matches!(next(&op(Phase::Created, 1000), &at(late)), Step::Abort(_)));
    }

    #[test]
    fn a_fault_hold_keeps_the_phase_until_it_has_passed() {
        let held = Observed { hold_ms: 500, ..at(1400) };
        assert_eq!(next(&op(Phase::Planned, 1000), &held), Step::Wait);
        let passed = Observed { hold_ms: 500, ..at(1600) };
        assert_eq!(next(&op(Phase::Planned, 1000), &passed), Step::CreateTarget);
    }

    #[test]
    fn capturing_freezes_only_once_the_backfill_is_done_and_the_target_is_close() {
        let phase = op(Phase::Capturing, 1000);
        assert_eq!(next(&phase, &at(1100)), Step::ObserveSource);
        let copying = Observed { source: Some(status(false, 10, 10)), ..at(1100) };
        assert_eq!(next(&phase, &copying), Step::Wait);
        let behind = Observed { source: Some(status(true, 1000, 1000 - FREEZE_BACKLOG - 1)), ..at(1100) };
        assert_eq!(next(&phase, &behind), Step::Wait);
        let close = Observed { source: Some(status(true, 1000, 1000 - FREEZE_BACKLOG)), ..at(1100) };
        assert!(matches!(next(&phase, &close), Step::Capture { report: Some(_), freeze: true }));
    }

    #[test]
    fn writes_too_fast_to_get_close_freeze_after_a_drained_round_once_the_catch_up_had_its_time() {
        let phase = op(Phase::Capturing, 1000);
        // Each round ships all it found, and as much again came meanwhile.
        let far = |drained, catching_up_for| Observed {
            source: Some(ForwardStatus { drained, ..status(true, 1000, 1000 - 5 * FREEZE_BACKLOG) }),
            catching_up_for,
            ..at(1100)
        };
        assert_eq!(next(&phase, &far(true, CATCH_UP_PATIENCE / 2)), Step::Wait, "still catching up");
        assert_eq!(next(&phase, &far(false, CATCH_UP_PATIENCE * 2)), Step::Wait, "a round left entries behind");
        assert!(matches!(next(&phase, &far(true, CATCH_UP_PATIENCE)), Step::Capture { freeze: true, .. }));
    }

    #[test]
    fn capturing_reports_progress_periodically_without_freezing() {
        let phase = op(Phase::Capturing, 1000);
        let due = Observed { source: Some(status(false, 10, 2)), since_report: REPORT_EVERY * 2, ..at(1100) };
        let Step::Capture { report: Some(p), freeze: false } = next(&phase, &due) else { panic!("expected a report") };
        assert_eq!(p.forward_backlog, 8);
    }

    #[test]
    fn a_capture_that_stands_still_past_the_stall_limit_is_abandoned() {
        let phase = op(Phase::Capturing, 1000);
        let limit = Duration::from_secs(60);
        let moving = Observed { stalled_for: limit / 2, stall_limit: limit, ..at(100_000) };
        assert_eq!(next(&phase, &moving), Step::ObserveSource, "long, but still moving");
        // Stalled: abandoned even before the source answers (a forwarder
        // that cannot start answers nothing at all).
        let stalled = Observed { stalled_for: limit * 2, stall_limit: limit, ..at(100_000) };
        assert!(matches!(next(&phase, &stalled), Step::Abort(r) if r.contains("no progress")));
        let never = Observed { stalled_for: limit * 2, stall_limit: Duration::ZERO, ..at(100_000) };
        assert_eq!(next(&phase, &never), Step::ObserveSource, "a zero limit never abandons");
        // A backfill that keeps failing is abandoned after so many attempts.
        let failing = Observed { source: Some(status(false, 0, 0)), attempts: MAX_BACKFILL_ATTEMPTS + 1, ..at(1100) };
        assert!(matches!(next(&phase, &failing), Step::Abort(r) if r.contains("backfill failed")));
        let retrying = Observed { source: Some(status(false, 0, 0)), attempts: MAX_BACKFILL_ATTEMPTS, ..at(1100) };
        assert_eq!(next(&phase, &retrying), Step::Wait);
        // The freeze has its own deadline: the stall limit is the capture's.
        let frozen = Observed { stalled_for: limit * 2, stall_limit: limit, ..at(1100) };
        assert_eq!(next(&op(Phase::Frozen, 1000), &frozen), Step::ObserveSource);
    }

    #[test]
    fn progress_never_goes_backwards_after_a_forwarder_restart() {
        let old =
            Progress { keys_copied: 50, bytes_copied: 5000, keys_total: 100, bytes_total: 10000, forward_backlog: 3 };
        let restarted = ForwardStatus { last_seq: 9, shipped: 9, ..Default::default() };
        let p = progress(&old, &restarted);
        assert_eq!((p.keys_copied, p.bytes_copied, p.keys_total, p.bytes_total), (50, 5000, 100, 10000));
        assert_eq!(p.forward_backlog, 0, "the backlog is always the current one");
        let further =
            ForwardStatus { keys_copied: 60, bytes_copied: 6000, keys_total: 100, bytes_total: 10000, ..restarted };
        assert_eq!(progress(&old, &further).keys_copied, 60);
    }

    #[test]
    fn a_freeze_the_source_has_not_shown_is_resent_but_not_at_every_poll() {
        let phase = op(Phase::Frozen, 1000);
        let unseen = |now, since| Observed { source: Some(status(true, 5, 5)), since_report: since, ..at(now) };
        assert_eq!(next(&phase, &unseen(1100, FREEZE_RESEND * 2)), Step::Wait, "too early to resend");
        assert_eq!(next(&phase, &unseen(1400, Duration::from_millis(10))), Step::Wait, "just resent");
        assert_eq!(next(&phase, &unseen(1400, FREEZE_RESEND * 2)), Step::ResendFreeze);
    }

    #[test]
    fn frozen_commits_only_when_the_target_has_everything_and_the_digests_match() {
        let phase = op(Phase::Frozen, 1000);
        let frozen = ForwardStatus { frozen_at: Some(40), digest: Some(0xabc), ..status(true, 40, 40) };
        let obs = |target: Option<Incoming>| Observed { source: Some(frozen.clone()), target, ..at(1200) };
        assert_eq!(next(&phase, &obs(None)), Step::ObserveTarget);
        assert_eq!(next(&phase, &obs(Some(incoming(7, 39, 0xabc)))), Step::ObserveTarget, "behind");
        assert_eq!(next(&phase, &obs(Some(incoming(7, 40, 0xabc)))), Step::Commit);
        assert!(matches!(next(&phase, &obs(Some(incoming(7, 40, 0xabd)))), Step::Abort(m) if m.contains("digest")));
        assert!(matches!(next(&phase, &obs(Some(incoming(8, 40, 0xabc)))), Step::Abort(_)), "another operation's");
        // No digest yet (the source's forwarder has not finished its round).
        let no_digest = Observed { source: Some(ForwardStatus { digest: None, ..frozen.clone() }), ..at(1200) };
        assert_eq!(next(&phase, &no_digest), Step::Wait);
    }

    #[test]
    fn a_freeze_is_never_held_past_its_deadline() {
        let phase = op(Phase::Frozen, 1000);
        let late = at(1000 + FREEZE_TIMEOUT.as_millis() as u64 + 1);
        assert!(matches!(next(&phase, &late), Step::Abort(m) if m.contains("freeze")));
    }

    #[test]
    fn the_last_phases_cut_over_or_clean_up_once() {
        assert_eq!(next(&op(Phase::Committed, 1000), &at(1100)), Step::Cutover);
        let mut aborted = op(Phase::Aborted, 1000);
        assert_eq!(next(&aborted, &at(1100)), Step::Cleanup);
        aborted.cleaned = true;
        assert_eq!(next(&aborted, &at(1100)), Step::Wait);
        assert_eq!(next(&op(Phase::Done, 1000), &at(1100)), Step::Wait);
    }
}
