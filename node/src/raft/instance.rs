//! A replica's openraft instance: live, dormant, or stopped.
//!
//! A quiet replica (see [`super::quiesce`]) costs no CPU, but its openraft
//! instance still holds memory: the core's task and channels, the state
//! machine worker, the replication streams of a leader, and preallocated
//! rings (4,096 engine commands, 8,192 client responders) that a group which
//! once worked hard — a split's new shard, say — has touched all through.
//! That is ~0.1–0.5 MiB a replica, the bulk of a node's memory once it holds
//! thousands of idle shards.
//!
//! So a replica quiet and idle for `--dormant-after-ms` ([`DORMANT_AFTER_MS`])
//! drops its instance and keeps only what the node reads of an idle group — its last Raft metrics, which
//! do not move while it is quiet — and reopens it from storage, as at
//! start-up, the moment anything needs Raft: a client request, a Raft
//! message, a membership step, a failover campaign. CockroachDB does the
//! same: a replica's Raft group is created lazily, on first use.
//!
//! The states and their transitions, each under the `transition` lock and
//! each run to its end in a task of its own (a caller's timeout cannot cut
//! one short):
//!
//! - **Live** → **Dormant** ([`GroupRaft::hibernate`]): only while quiet,
//!   long idle, settled (a leader that went quiet as leader, or a follower
//!   that knows its leader), with no caller holding the instance — users
//!   clone it under the slot's mutex, so the check and the swap cannot
//!   miss one. The old instance is shut down and its incarnation ended
//!   before the lock is released, so a reopened one never runs beside it.
//! - **Dormant** → **Live** (`GroupRaft::live`): a fresh instance
//!   over the same storage and the same in-memory state (nothing wrote
//!   either meanwhile — except a snapshot install the old instance was
//!   running when it ended: the reopen finishes it from storage, as start-up
//!   does after a crash, and reloads the state it left). It opens quiet, as
//!   at start-up; openraft restores a leader as leader, and the quiescer's
//!   sweep wakes it.
//! - any → **Stopped** ([`GroupRaft::shutdown`]): for good. A stopped
//!   replica reports itself shut down and leaderless, agrees to nothing and
//!   stores no snapshot chunk.

use std::sync::{Arc, Mutex};

use openraft::async_runtime::WatchReceiver;
use openraft::{Raft, RaftMetrics, ServerState};

use super::incarnation::Incarnation;
use super::state_machine::GroupSm;
use super::TypeConfig;

/// By default, a quiet replica idle for this long (ms) drops its openraft
/// instance (`--dormant-after-ms`).
pub const DORMANT_AFTER_MS: u64 = 15_000;

/// The openraft handle of a replica.
pub(super) type RaftHandle = Raft<TypeConfig, GroupSm>;
/// openraft's view of a replica.
pub(super) type Metrics = RaftMetrics<TypeConfig>;

/// One incarnation of a replica's openraft instance.
pub(super) struct Instance {
    pub(super) raft: RaftHandle,
    /// Storage writes of this instance's tasks stop when it ends.
    pub(super) incarnation: Arc<Incarnation>,
}

enum Slot {
    Live(Arc<Instance>),
    /// No instance; the metrics it had when it was dropped.
    Dormant(Arc<Metrics>),
    /// No instance, for good; the last metrics, marked shut down and
    /// leaderless (a stopped replica leads and follows no one).
    Stopped(Arc<Metrics>),
}

/// Why no instance is available.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("the replica was stopped")]
    Stopped,
    #[error("reopening the replica: {0}")]
    Reopen(String),
}

/// The slot holding a replica's instance; see the module.
///
/// Every transition runs to its end in a task of its own, holding the
/// `transition` lock: a caller that gives up half way (a request's
/// timeout) must not leave a half-started instance that no slot owns, nor
/// release the lock before the old instance has ended.
pub(super) struct InstanceSlot {
    slot: Mutex<Slot>,
    /// Serialises the transitions.
    transition: Arc<tokio::sync::Mutex<()>>,
}

impl InstanceSlot {
    /// A slot with no instance yet: the first [`Self::get`] starts one.
    pub(super) fn unopened(id: super::ReplicaId) -> Arc<InstanceSlot> {
        let m = Metrics::new_initial(id);
        Arc::new(InstanceSlot { slot: Mutex::new(Slot::Dormant(Arc::new(m))), transition: Default::default() })
    }

    /// The live instance, if any (no reopening).
    pub(super) fn live(&self) -> Option<Arc<Instance>> {
        match &*self.slot.lock().unwrap() {
            Slot::Live(i) => Some(i.clone()),
            _ => None,
        }
    }

    pub(super) fn is_dormant(&self) -> bool {
        matches!(&*self.slot.lock().unwrap(), Slot::Dormant(_))
    }

    pub(super) fn is_stopped(&self) -> bool {
        matches!(&*self.slot.lock().unwrap(), Slot::Stopped(_))
    }

    /// Runs `f` on the replica's metrics: the live instance's, or those it
    /// had when it went dormant or stopped.
    pub(super) fn with_metrics<R>(&self, f: impl FnOnce(&Metrics) -> R) -> R {
        let frozen = match &*self.slot.lock().unwrap() {
            Slot::Live(i) => Err(i.clone()),
            Slot::Dormant(m) | Slot::Stopped(m) => Ok(m.clone()),
        };
        match frozen {
            Ok(m) => f(&m),
            Err(i) => {
                let rx = i.raft.metrics();
                let m = rx.borrow_watched();
                f(&m)
            }
        }
    }

    /// The live instance, started by `reopen` if dormant (or not opened
    /// yet). The reopen runs to its end even if the caller gives up.
    pub(super) async fn get<Fut>(self: &Arc<Self>, reopen: impl FnOnce() -> Fut) -> Result<Arc<Instance>, Unavailable>
    where
        Fut: std::future::Future<Output = Result<Instance, Unavailable>> + Send + 'static,
    {
        if let Some(i) = self.live() {
            return Ok(i);
        }
        let t = self.transition.clone().lock_owned().await;
        match &*self.slot.lock().unwrap() {
            Slot::Live(i) => return Ok(i.clone()),
            Slot::Stopped(_) => return Err(Unavailable::Stopped),
            Slot::Dormant(_) => {}
        }
        let (this, reopen) = (self.clone(), reopen());
        let task = tokio::spawn(async move {
            let instance = Arc::new(reopen.await?);
            *this.slot.lock().unwrap() = Slot::Live(instance.clone());
            drop(t);
            metrics::counter!("cleave_raft_instances_started_total").increment(1);
            Ok(instance)
        });
        task.await.map_err(|e| Unavailable::Reopen(format!("the reopening task failed: {e}")))?
    }

    /// Drops the live instance if `may(&metrics)` holds while no one else
    /// holds it; answers whether it did. Returns at once if a transition is
    /// under way.
    pub(super) async fn hibernate(&self, may: impl FnOnce(&Metrics) -> bool) -> bool {
        let Ok(t) = self.transition.clone().try_lock_owned() else { return false };
        let instance = {
            let mut slot = self.slot.lock().unwrap();
            let Slot::Live(i) = &*slot else { return false };
            // Users clone under this mutex: a count of one is no user at all.
            if Arc::strong_count(i) != 1 {
                return false;
            }
            let m = i.raft.metrics().borrow_watched().clone();
            if !may(&m) {
                return false;
            }
            let i = i.clone();
            *slot = Slot::Dormant(Arc::new(m));
            i
        };
        end_holding(instance, t).await;
        metrics::counter!("cleave_raft_dormant_total").increment(1);
        true
    }

    /// Stops the replica for good (see `GroupRaft::shutdown`).
    pub(super) async fn stop(&self) {
        let t = self.transition.clone().lock_owned().await;
        let live = {
            let mut slot = self.slot.lock().unwrap();
            let (live, last) = match &*slot {
                Slot::Live(i) => (Some(i.clone()), i.raft.metrics().borrow_watched().clone()),
                Slot::Dormant(m) | Slot::Stopped(m) => (None, (**m).clone()),
            };
            *slot = Slot::Stopped(Arc::new(stopped(last)));
            live
        };
        if let Some(i) = live {
            end_holding(i, t).await;
        }
    }

    /// The incarnation of the live instance (tests).
    #[cfg(test)]
    pub(super) fn live_incarnation(&self) -> Option<Arc<Incarnation>> {
        self.live().map(|i| i.incarnation.clone())
    }
}

/// What a stopped replica reports: its last metrics, shut down, with no
/// leader (so nothing takes it for a leader or a follower of one).
fn stopped(mut m: Metrics) -> Metrics {
    m.state = ServerState::Shutdown;
    m.current_leader = None;
    m.replication = None;
    m
}

/// Ends `i` (see [`end`]) in a task of its own that holds the transition
/// lock `t` until the instance has ended, whether or not the caller waits.
async fn end_holding(i: Arc<Instance>, t: tokio::sync::OwnedMutexGuard<()>) {
    let task = tokio::spawn(async move {
        end(i).await;
        drop(t);
    });
    if let Err(e) = task.await {
        tracing::error!("ending a replica's instance: {e}");
    }
}

/// Shuts an instance down and ends its incarnation: once this returns, none
/// of its tasks writes to storage any more.
async fn end(i: Arc<Instance>) {
    if let Err(e) = i.raft.shutdown().await {
        tracing::warn!("shutting a replica's instance down: {e}");
    }
    let inc = i.incarnation.clone();
    // `end` waits for a write in progress: off the async workers.
    if tokio::task::spawn_blocking(move || inc.end()).await.is_err() {
        i.incarnation.end();
    }
}
