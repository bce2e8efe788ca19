//! The metadata leader's side: drive every running operation through its
//! phases, resuming from the phase recorded in the directory.
//!
//! One task per operation loops: read the operation from the directory, do
//! the work of its phase (each step idempotent), then record the next phase
//! with a compare-and-set entry. A new metadata leader simply starts the
//! loop again for every operation that is not finished.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cleave_metadata::{MetaCommand, MetaResponse, OpId, OpKind, Operation, Phase, Progress, RangeState};

use crate::command::ShardCommand;
use crate::kv::{Incoming, ShardState};
use crate::node::Node;
use crate::raft::SmState;
use crate::rpc::{ExecError, NodeReply, NodeRequest};

/// Forward-log entries the target may lag behind by when the source freezes.
const FREEZE_BACKLOG: u64 = 64;
/// How long creating the new shard may take before the split is abandoned.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a freeze may go unseen at the source before it is sent again.
const FREEZE_RESEND: Duration = Duration::from_millis(250);
/// How long writes may stay frozen before the split is abandoned.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Fault point for tests (`--fault-hold capturing=2000,frozen=500`): keeps
/// every operation in the named phases for at least that many milliseconds
/// (from when it entered the phase, as recorded in the directory, so the
/// hold survives a change of metadata leader). Tests use it to kill nodes
/// at a chosen phase. Besides phase names, `enter_joint=MS` holds a move
/// in `Joint` *before* its joint configuration is entered (a hold of
/// `joint` holds it inside the joint configuration).
static HOLDS: std::sync::OnceLock<Vec<(String, u64)>> = std::sync::OnceLock::new();

/// Hold points that are not phases.
const EXTRA_HOLDS: [&str; 1] = ["enter_joint"];

/// Parses and installs the fault-point spec; call once at start-up.
pub fn set_fault_hold(spec: &str) -> anyhow::Result<()> {
    let mut holds = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, ms) = part.split_once('=').ok_or_else(|| anyhow::anyhow!("{part:?} is not PHASE=MS"))?;
        let name = name.trim();
        if !EXTRA_HOLDS.contains(&name) {
            serde_json::from_value::<Phase>(serde_json::Value::String(name.into()))
                .map_err(|_| anyhow::anyhow!("unknown phase {name:?}"))?;
        }
        holds.push((name.to_string(), ms.trim().parse()?));
    }
    let _ = HOLDS.set(holds);
    Ok(())
}

/// The hold of a named point (a phase's name, or one of [`EXTRA_HOLDS`]).
pub fn hold_named_ms(name: &str) -> u64 {
    HOLDS.get().and_then(|h| h.iter().find(|(p, _)| p == name)).map_or(0, |(_, ms)| *ms)
}

pub fn hold_ms(phase: Phase) -> u64 {
    match serde_json::to_value(phase) {
        Ok(serde_json::Value::String(name)) => hold_named_ms(&name),
        _ => 0,
    }
}

/// Operations this node is driving.
#[derive(Default)]
pub struct Drivers {
    running: Mutex<HashSet<OpId>>,
}

/// While this node leads the metadata group, drives every active operation.
pub async fn supervise(node: Arc<Node>) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if !node.confirmed_meta_leader().await {
            continue;
        }
        let ops: Vec<OpId> = node.directory().active_ops().map(|o| o.op_id).collect();
        for op in ops {
            if !node.drivers.running.lock().unwrap().insert(op) {
                continue;
            }
            let node = node.clone();
            tokio::spawn(async move {
                drive(&node, op).await;
                node.drivers.running.lock().unwrap().remove(&op);
            });
        }
    }
}

async fn drive(node: &Arc<Node>, op_id: OpId) {
    let mut last_progress = Instant::now();
    let mut failures = 0u32;
    loop {
        if !node.confirmed_meta_leader().await {
            return;
        }
        let Some(op) = node.directory().ops.get(&op_id).cloned() else { return };
        if op.phase == Phase::Done || (op.phase == Phase::Aborted && op.cleaned) {
            return;
        }
        match step(node, &op, &mut last_progress).await {
            Ok(true) => failures = 0,
            Ok(false) => {
                tokio::time::sleep(Duration::from_millis(if op.phase == Phase::Frozen { 1 } else { 20 })).await
            }
            Err(e) => {
                failures += 1;
                tracing::debug!(op = op_id, kind = op.kind.name(), phase = ?op.phase, "step failed: {e}");
                tokio::time::sleep(Duration::from_millis((20 * failures as u64).min(500))).await;
            }
        }
    }
}

/// Proposes `cmd` to the metadata group (this node leads it).
pub(crate) async fn meta(node: &Node, cmd: MetaCommand) -> Result<MetaResponse, ExecError> {
    node.propose_meta(cmd, 0).await
}

/// Records that `op` moved from its current phase to `to` (compare-and-set).
pub(crate) async fn advance(node: &Node, op: &Operation, to: Phase) -> Result<(), ExecError> {
    meta(node, MetaCommand::AdvanceOp { op_id: op.op_id, from: op.phase, to, now_ms: now_ms() }).await?;
    Ok(())
}

/// Does the work of `op`'s current phase. `Ok(true)`: it moved on;
/// `Ok(false)`: nothing to do yet.
async fn step(node: &Arc<Node>, op: &Operation, last_progress: &mut Instant) -> Result<bool, ExecError> {
    let OpKind::Split { range_id, split_key, source, target, new_range_id, target_replicas, .. } = &op.kind else {
        return crate::moves::driver::step(node, op, last_progress).await;
    };
    let dir = node.directory();
    let in_phase_ms = now_ms().saturating_sub(op.entered(op.phase).unwrap_or(0));
    let hold = hold_ms(op.phase);
    if hold > 0 && in_phase_ms < hold {
        return Ok(false);
    }
    if matches!(op.phase, Phase::Planned | Phase::Created) && in_phase_ms > SETUP_TIMEOUT.as_millis() as u64 {
        return abort(node, op, "the new shard's replicas could not be set up in time").await;
    }
    match op.phase {
        Phase::Planned => {
            let range = dir.range(*range_id).ok_or(ExecError::Internal(format!("range {range_id} vanished")))?;
            let state = SmState::Shard(ShardState {
                incoming: Some(Incoming {
                    op_id: op.op_id,
                    start: split_key.clone(),
                    end: range.end.clone(),
                    watermark: 0,
                    digest: 0,
                    backfill: None,
                    backfill_copied: (0, 0),
                    capture_base: 0,
                }),
                ..Default::default()
            });
            let members: Vec<(u64, u64, String)> = target_replicas
                .iter()
                .map(|r| {
                    (
                        r.replica_id,
                        r.node_id,
                        dir.nodes.get(&r.node_id).map(|n| n.raft_addr.clone()).unwrap_or_default(),
                    )
                })
                .collect();
            // The replica next to the source's leader campaigns, so the new
            // group has a leader at once, close to where its data comes from.
            let source_leader = node.leader_hint(*source);
            let campaigner = target_replicas
                .iter()
                .find(|r| Some(r.node_id) == source_leader)
                .or(target_replicas.first())
                .map(|r| r.replica_id);
            // Create the campaigner last: its election needs the others to exist.
            let mut order: Vec<_> = target_replicas.iter().collect();
            order.sort_by_key(|r| Some(r.replica_id) == campaigner);
            for r in order {
                let req = NodeRequest::CreateGroup {
                    group: *target,
                    replica_id: r.replica_id,
                    members: members.clone(),
                    state: state.clone(),
                    campaign: Some(r.replica_id) == campaigner,
                    dir_version: dir.version,
                };
                node.node_call(r.node_id, req).await?;
            }
            metrics::counter!("cleave_splits_started_total").increment(1);
            advance(node, op, Phase::Created).await?;
            Ok(true)
        }
        Phase::Created => {
            let range = dir.range(*range_id).ok_or(ExecError::Internal(format!("range {range_id} vanished")))?;
            let cmd = ShardCommand::BeginCapture {
                op_id: op.op_id,
                start: split_key.clone(),
                end: range.end.clone(),
                target: *target,
            };
            node.shard_step(*source, cmd, 0).await?;
            advance(node, op, Phase::Capturing).await?;
            Ok(true)
        }
        Phase::Capturing => {
            let st = split_status(node, *source, op.op_id).await?;
            let ready = st.backfill_done && st.last_seq.saturating_sub(st.shipped) <= FREEZE_BACKLOG;
            if ready || last_progress.elapsed() > Duration::from_millis(500) {
                *last_progress = Instant::now();
                // A forwarder restarted after the backfill knows no copy
                // figures: keep the ones reported before.
                let copied = if st.bytes_copied >= op.progress.bytes_copied { &st } else { &Default::default() };
                let old = &op.progress;
                let progress = Progress {
                    keys_copied: copied.keys_copied.max(old.keys_copied),
                    bytes_copied: copied.bytes_copied.max(old.bytes_copied),
                    keys_total: copied.keys_total.max(old.keys_total),
                    bytes_total: copied.bytes_total.max(old.bytes_total),
                    forward_backlog: st.last_seq.saturating_sub(st.shipped),
                };
                meta(node, MetaCommand::ReportProgress { op_id: op.op_id, progress }).await?;
            }
            if !ready {
                return Ok(false);
            }
            // The freeze and its record are independent (both idempotent):
            // run them together to keep the write pause short.
            let (frozen, recorded) = tokio::join!(
                node.shard_step(*source, ShardCommand::Freeze { op_id: op.op_id }, 0),
                advance(node, op, Phase::Frozen)
            );
            frozen?;
            recorded?;
            Ok(true)
        }
        Phase::Frozen => {
            let frozen_for = now_ms().saturating_sub(op.entered(Phase::Frozen).unwrap_or(0));
            if frozen_for > FREEZE_TIMEOUT.as_millis() as u64 {
                return abort(node, op, "freeze timed out before the target caught up").await;
            }
            let st = split_status(node, *source, op.op_id).await?;
            if st.frozen_at.is_none() {
                // The freeze was recorded here but may not have reached the
                // source (a failed send): send it again (idempotent) rather
                // than wait out the freeze deadline — not at every poll,
                // though (the forwarder reports the freeze only after its
                // next round), so as not to load the paused shard's log.
                if frozen_for > FREEZE_RESEND.as_millis() as u64 && last_progress.elapsed() > FREEZE_RESEND {
                    *last_progress = Instant::now();
                    node.shard_step(*source, ShardCommand::Freeze { op_id: op.op_id }, 0).await?;
                }
                return Ok(false);
            }
            let Some(source_digest) = st.digest else { return Ok(false) };
            // Any replica of the target that has applied the forward log up to
            // the last entry proves the target's log holds it: no read
            // barrier needed, which keeps the frozen window short.
            let mut inc = None;
            for leader_only in [false, true] {
                let reply = if leader_only {
                    node.incoming_status(*target, 0).await?
                } else {
                    node.incoming_status_any(*target).await?
                };
                let NodeReply::Incoming { incoming: Some(i), .. } = reply else {
                    return Err(ExecError::Internal("target is not receiving".into()));
                };
                if i.watermark >= st.last_seq {
                    inc = Some(i);
                    break;
                }
            }
            let Some(inc) = inc else { return Ok(false) };
            if inc.digest != source_digest {
                return abort(node, op, &format!("digest mismatch: source {source_digest:x}, target {:x}", inc.digest))
                    .await;
            }
            meta(node, MetaCommand::CommitSplit { op_id: op.op_id, now_ms: now_ms() }).await?;
            metrics::counter!("cleave_splits_committed_total").increment(1);
            Ok(true)
        }
        Phase::Committed => {
            let left = dir.range(*range_id).cloned().ok_or(ExecError::Internal("left range missing".into()))?;
            let right = dir.range(*new_range_id).cloned().ok_or(ExecError::Internal("right range missing".into()))?;
            let NodeReply::Incoming { keys, bytes, .. } = node.incoming_status(*target, 0).await? else {
                return Err(ExecError::Internal("unexpected reply".into()));
            };
            let done = ShardCommand::SplitDone {
                op_id: op.op_id,
                left,
                moved: right.clone(),
                moved_keys: keys,
                moved_bytes: bytes,
            };
            node.shard_step(*source, done, 0).await?;
            node.shard_step(*target, ShardCommand::Activate { op_id: op.op_id, ranges: vec![right] }, 0).await?;
            let pause = op.entered(Phase::Frozen).map(|f| now_ms().saturating_sub(f));
            if let Some(p) = pause {
                metrics::histogram!("cleave_split_write_pause_seconds").record(p as f64 / 1000.0);
            }
            meta(node, MetaCommand::FinishOp { op_id: op.op_id, write_pause_ms: pause, now_ms: now_ms() }).await?;
            node.refresh_directory().await;
            Ok(true)
        }
        Phase::Aborted => {
            // EndCapture always applies; it also makes the source refuse a
            // BeginCapture of this operation that arrives late.
            node.shard_step(*source, ShardCommand::EndCapture { op_id: op.op_id }, 0).await?;
            for r in target_replicas {
                node.destroy_replica_at(r.node_id, *target, r.replica_id).await?;
            }
            meta(node, MetaCommand::MarkCleaned { op_id: op.op_id }).await?;
            Ok(true)
        }
        Phase::Done | Phase::Learning | Phase::Joint => Ok(false),
    }
}

async fn abort(node: &Node, op: &Operation, reason: &str) -> Result<bool, ExecError> {
    tracing::warn!(op = op.op_id, "aborting split: {reason}");
    let cmd =
        MetaCommand::AbortOp { op_id: op.op_id, reason: reason.to_string(), now_ms: now_ms(), learner_only: false };
    meta(node, cmd).await?;
    metrics::counter!("cleave_splits_aborted_total").increment(1);
    Ok(true)
}

async fn split_status(node: &Node, shard: u64, op: OpId) -> Result<crate::rpc::ForwardStatus, ExecError> {
    match node.split_status(shard, op, 0).await? {
        NodeReply::SplitStatus(s) => Ok(s),
        other => Err(ExecError::Internal(format!("unexpected reply {other:?}"))),
    }
}

/// The nodes for a new shard's replicas: nodes this metadata leader heard
/// from recently (a node it has not heard from is never taken for the
/// emptiest), fewest replicas first; refused when too few are live.
pub fn place(node: &Node, count: usize) -> Result<Vec<u64>, ExecError> {
    Ok(node.directory().place_new_group(&node.tracker.live_nodes(), count)?)
}

impl Node {
    /// Starts a split as metadata leader (forwarding there if needed).
    pub async fn start_split(
        &self,
        range_id: Option<u64>,
        key: Option<String>,
        reason: String,
        hops: u8,
    ) -> Result<OpId, ExecError> {
        if !self.is_meta_leader() {
            let req = |hops| NodeRequest::StartSplit { range_id, key: key.clone(), reason: reason.clone(), hops };
            return match self.forward_to_meta_leader(hops, req).await? {
                NodeReply::Index(op) => Ok(op),
                other => Err(ExecError::Internal(format!("unexpected reply {other:?}"))),
            };
        }
        let dir = self.directory();
        let range = match (range_id, &key) {
            (Some(id), _) => {
                dir.range(id).cloned().ok_or(ExecError::Meta(cleave_metadata::MetaError::UnknownRange(id)))?
            }
            (None, Some(k)) => dir.lookup(k).cloned().ok_or(ExecError::Unavailable("directory not loaded".into()))?,
            (None, None) => return Err(ExecError::Internal("a split needs a key or a range".into())),
        };
        if let RangeState::Busy { op_id } = range.state {
            return Err(ExecError::Meta(cleave_metadata::MetaError::RangeBusy { range_id: range.range_id, op_id }));
        }
        let split_key = match key {
            Some(k) => k,
            None => {
                let req = |hops| NodeRequest::MedianKey {
                    shard: range.shard_id,
                    start: range.start.clone(),
                    end: range.end.clone(),
                    by_load: reason == "load",
                    hops,
                };
                match self
                    .median_key(range.shard_id, &range.start, range.end.as_deref(), reason == "load", 0, req)
                    .await?
                {
                    NodeReply::Key(Some(k)) => k,
                    NodeReply::Key(None) => {
                        return Err(ExecError::Meta(cleave_metadata::MetaError::BadSplitKey {
                            range_id: range.range_id,
                            key: String::new(),
                        }))
                    }
                    other => return Err(ExecError::Internal(format!("unexpected reply {other:?}"))),
                }
            }
        };
        let replication = dir.shards.get(&range.shard_id).map_or(3, |s| s.replicas.len()).max(1);
        let targets = place(self, replication)?;
        match self
            .propose_meta(
                MetaCommand::PlanSplit {
                    range_id: range.range_id,
                    split_key,
                    target_nodes: targets,
                    reason,
                    now_ms: now_ms(),
                },
                0,
            )
            .await?
        {
            MetaResponse::Op(op) => Ok(op),
            other => Err(ExecError::Internal(format!("unexpected answer {other:?}"))),
        }
    }
}
