//! The coordinator of a transaction: the node that took `POST /v1/txn`.
//!
//! It routes the keys and runs one attempt after another until one
//! decides or the request's deadline passes:
//! - all keys on one shard: one `OnePhase` entry there;
//! - several shards: `Lock` on each (in parallel), decide with every lock
//!   held, `CommitPrimary` (the commit point — with no writes, the proof
//!   that every lock was still held), answer, then finish the other shards
//!   and `Forget` the primary's record in the background.
//!
//! An attempt that cannot finish (a lock held by another transaction, a
//! shard without a leader, a route gone stale) is abandoned — its locks
//! released, and aborted at its primary first whenever a step of it may
//! still land — and the next attempt starts under a new transaction id.
//! Only a commit whose outcome cannot be learned is answered "outcome
//! unknown".

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_metadata::ShardId;

use super::apply::{Routed, Status, TxnCommand, TxnReply};
use super::plan::{self, Decided, Stored, Txn};
use super::resolve::{self, ask_primary, finish_keys, now_ms, route_all};
use crate::node::Node;
use crate::router::{self, Router};
use crate::rpc::ExecError;
use crate::storage::txn_info::{PendingWrite, TxnId};

/// How long a transaction's locks stay valid from when they are asked for:
/// whoever meets one after that may abort the transaction (a coordinator
/// still alive then finds its commit refused and tries again). Short, so
/// that a coordinator's death holds its keys only briefly; TiKV's default
/// lock TTL is 3 s too.
const LOCK_TTL: Duration = Duration::from_secs(3);

/// The most the background finishing of a committed transaction tries.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Time given to learning a commit's outcome when the commit's own answer
/// was lost, and to abandoning an attempt.
const AFTERMATH: Duration = Duration::from_secs(3);

/// Runs `txn` to its end: the branch that ran, its results and writes.
pub async fn run(node: &Arc<Node>, txn: Txn) -> Result<Decided, ExecError> {
    let keys = plan::keys(&txn);
    if keys.is_empty() {
        return Ok(plan::evaluate(&txn, |_| Stored::default()));
    }
    let router = Router::new(node);
    let started = Instant::now();
    let deadline = started + node.settings().write_timeout;
    let (txn, keys) = (&txn, &keys);
    let router_ref = &router;
    let r = resolve::settling(router_ref, deadline, || {
        router::with_retries(router_ref, deadline, move || async move {
            let groups = route_all(router_ref, keys.iter().map(|(k, w)| (k.as_str(), *w)), deadline).await?;
            let path = if groups.len() == 1 { "one_shard" } else { "multi_shard" };
            metrics::counter!("cleave_txn_attempts_total", "path" => path).increment(1);
            if groups.len() == 1 {
                let (shard, keys) = groups.into_iter().next().expect("one group");
                let keys = keys.into_iter().map(|(r, _)| r).collect();
                let cmd = TxnCommand::OnePhase { keys, txn: txn.clone() };
                match router_ref.exec_txn(shard, cmd, 0, deadline).await? {
                    TxnReply::Decided(d) => Ok(d),
                    other => Err(ExecError::Internal(format!("a one-shard transaction answered {other:?}"))),
                }
            } else {
                several(node, router_ref, groups, txn, deadline).await
            }
        })
    })
    .await;
    // Shard 0 in the request metrics: a transaction is not one shard's.
    crate::metrics::record_request(0, "txn", started, r.is_ok());
    r
}

/// One attempt at a transaction over several shards.
async fn several(
    node: &Arc<Node>,
    router: &Router<'_>,
    groups: BTreeMap<ShardId, Vec<(Routed, bool)>>,
    txn: &Txn,
    deadline: Instant,
) -> Result<Decided, ExecError> {
    let id: TxnId = rand::random();
    let primary = groups.values().flatten().map(|(r, _)| r).min_by(|a, b| a.key.cmp(&b.key)).expect("keys").clone();
    let expires_ms = now_ms() + LOCK_TTL.as_millis() as u64;
    let attempt = Attempt { id, primary: primary.key.clone(), expires_ms };
    let locks = groups.iter().map(|(shard, keys)| {
        let cmd = TxnCommand::Lock { txn: id, primary: primary.key.clone(), expires_ms, keys: keys.clone() };
        router.exec_txn(*shard, cmd, 0, deadline)
    });
    let answers = futures::future::join_all(locks).await;
    let all_keys: Vec<String> = groups.values().flatten().map(|(r, _)| r.key.clone()).collect();
    let mut states: HashMap<String, Stored> = HashMap::new();
    let mut failed: Option<ExecError> = None;
    // Whether some lock step may still land (its answer was lost).
    let mut in_doubt = false;
    for ((_, keys), answer) in groups.iter().zip(answers) {
        match answer {
            Ok(TxnReply::Locked(got, lock_ts)) if got.len() == keys.len() => {
                // The commit is stamped from this clock: above every lock.
                node.ctx().clock.observe(lock_ts);
                states.extend(keys.iter().map(|(r, _)| r.key.clone()).zip(got));
            }
            Ok(other) => failed = Some(ExecError::Internal(format!("a txn lock answered {other:?}"))),
            Err(e) => {
                in_doubt |= !matches!(e, ExecError::Kv(_));
                // A lock held by another transaction says the most: keep it.
                if failed.as_ref().is_none_or(|f| !is_locked(f)) {
                    failed = Some(not_applied(e));
                }
            }
        }
    }
    if let Some(e) = failed {
        abandon(node, &attempt, in_doubt, all_keys);
        return Err(e);
    }
    let decided = plan::evaluate(txn, |k| states.get(k).cloned().unwrap_or_default());
    crate::ops::faults::hold_txn("txn_locked").await;
    let (pshard, pkeys) = groups.iter().find(|(_, ks)| ks.iter().any(|(r, _)| r.key == primary.key)).expect("primary");
    // With no writes this still goes to the primary: the values were read
    // by separate steps, and only a step that finds the primary's lock
    // still held proves no lock was taken away (an expired one aborted by
    // someone else) in between — that all were held at once.
    let commit = TxnCommand::CommitPrimary {
        txn: id,
        primary: primary.clone(),
        keys: pkeys.iter().map(|(r, _)| r.clone()).collect(),
        writes: decided.writes.clone(),
        now_ms: now_ms(),
    };
    // Stamped above every lock's timestamp (observed above): the commit
    // timestamp, at which every shard writes the transaction's changes.
    let at = node.ctx().clock.now();
    let mut commit_ts = 0;
    let committed = match router.exec_txn_at(*pshard, commit, at, 0, deadline).await {
        Ok(TxnReply::Status(Status::Committed(_, ts))) => {
            commit_ts = ts;
            true
        }
        Ok(TxnReply::Status(_)) => false,
        Ok(other) => return Err(ExecError::Internal(format!("a txn commit answered {other:?}"))),
        // Refused, or lost: the entry may have landed (a refusal before
        // the proposal means it did not, and asking costs only time here).
        // Settle it at the primary, aborting it if it did not land (then it
        // never can: the abort releases the lock the commit needs).
        Err(e) => {
            let asking = deadline.max(Instant::now() + AFTERMATH);
            match ask_primary(router, id, &primary.key, expires_ms, true, asking).await {
                Ok(Status::Committed(_, ts)) => {
                    commit_ts = ts;
                    true
                }
                Ok(_) if router::retryable(&e) => {
                    abandon(node, &attempt, false, all_keys);
                    return Err(e);
                }
                Ok(_) => false,
                // Refused before it was proposed: it never lands, whatever
                // the primary could not be asked. Not applied, retry.
                Err(_) if router::retryable(&e) => {
                    abandon(node, &attempt, true, all_keys);
                    return Err(e);
                }
                Err(e2) => {
                    return Err(ExecError::Indeterminate(format!(
                        "transaction outcome unknown: the commit ({e}) and asking its primary ({e2}) both failed"
                    )))
                }
            }
        }
    };
    if !committed {
        // Someone found the transaction abandoned and aborted it: try again.
        abandon(node, &attempt, false, all_keys);
        return Err(ExecError::Kv(crate::command::KvError::TxnAborted));
    }
    if decided.writes.is_empty() {
        release(node, id, all_keys);
        return Ok(decided);
    }
    crate::ops::faults::hold_txn("txn_committed").await;
    let others: Vec<String> =
        groups.iter().filter(|(s, _)| *s != pshard).flat_map(|(_, ks)| ks.iter().map(|(r, _)| r.key.clone())).collect();
    finish_committed(node, id, primary.key, others, decided.writes.clone(), commit_ts);
    Ok(decided)
}

fn is_locked(e: &ExecError) -> bool {
    matches!(e, ExecError::Kv(crate::command::KvError::Locked { .. }))
}

/// A failed lock step: nothing was decided, so even a lost answer only
/// means the attempt is over (it is abandoned, and the next one runs).
fn not_applied(e: ExecError) -> ExecError {
    match e {
        ExecError::Timeout(m) | ExecError::Indeterminate(m) => ExecError::Unavailable(format!("locking: {m}")),
        e => e,
    }
}

/// One attempt at a transaction: its id, primary key and lock expiry.
struct Attempt {
    id: TxnId,
    primary: String,
    expires_ms: u64,
}

/// In the background: releases the locks of an attempt given up, which
/// never sends its commit. When a lock step of it may still land
/// (`in_doubt`: its answer was lost), it is first aborted at its primary,
/// so that such a lock finds it over (resolved at once, not held until it
/// expires). Otherwise releasing is enough: no commit can follow.
fn abandon(node: &Arc<Node>, attempt: &Attempt, in_doubt: bool, keys: Vec<String>) {
    let node = node.clone();
    let (id, primary, expires_ms) = (attempt.id, attempt.primary.clone(), attempt.expires_ms);
    tokio::spawn(async move {
        let router = Router::new(&node);
        let deadline = Instant::now() + AFTERMATH;
        let mut writes = None;
        if in_doubt {
            match ask_primary(&router, id, &primary, expires_ms, true, deadline).await {
                // Never expected (a commit is given up only when it was
                // refused before it was proposed), but if it committed after
                // all, its keys are finished as committed, not rolled back.
                Ok(Status::Committed(w, ts)) => writes = Some((w, ts)),
                Ok(_) => {}
                Err(e) => {
                    // Unsettled: its locks are left to whoever meets them,
                    // who settles them at the primary first.
                    tracing::debug!("abandoning txn {id:032x}: {e}");
                    return;
                }
            }
        }
        let writes = writes.as_ref().map(|(w, ts)| (w.as_slice(), *ts));
        if let Err(e) = finish_keys(&router, id, &keys, writes, deadline).await {
            tracing::debug!("releasing txn {id:032x}: {e}");
        }
    });
}

/// In the background: releases the locks of a transaction that wrote nothing.
fn release(node: &Arc<Node>, id: TxnId, keys: Vec<String>) {
    let node = node.clone();
    tokio::spawn(async move {
        let router = Router::new(&node);
        if let Err(e) = finish_keys(&router, id, &keys, None, Instant::now() + AFTERMATH).await {
            tracing::debug!("releasing read-only txn {id:032x}: {e}");
        }
    });
}

/// In the background: commits a committed transaction's other keys, then
/// drops its record on the primary. Whatever this does not get to is
/// finished by whoever meets the locks.
fn finish_committed(
    node: &Arc<Node>,
    id: TxnId,
    primary: String,
    keys: Vec<String>,
    writes: Vec<PendingWrite>,
    commit_ts: crate::clock::Ts,
) {
    let node = node.clone();
    tokio::spawn(async move {
        let router = Router::new(&node);
        let deadline = Instant::now() + FINISH_TIMEOUT;
        if let Err(e) = finish_keys(&router, id, &keys, Some((&writes, commit_ts)), deadline).await {
            tracing::info!("finishing committed txn {id:032x}: {e} (its locks are finished when met)");
            return;
        }
        let forget = router::with_retries(&router, deadline, || async {
            let range = router.range_of(&primary, deadline).await?;
            let cmd = TxnCommand::Forget { txn: id, primary: resolve::routed(&primary, &range) };
            router.exec_txn(range.shard_id, cmd, 0, deadline).await
        });
        if let Err(e) = forget.await {
            tracing::info!("forgetting committed txn {id:032x}: {e}");
        }
    });
}
