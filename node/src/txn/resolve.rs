//! Meeting someone else's lock: ask the transaction's primary what became
//! of it, and finish it on the key before going on.
//!
//! The primary's answer is final when it is `Committed` or `Aborted` (both
//! recorded on the primary's record by one Raft entry, and never changed
//! after). `Pending` means the coordinator may still commit: a writer backs
//! off and asks again; a lock past its expiry is aborted by the asking, so
//! an abandoned transaction holds its keys at most until then.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cleave_metadata::ShardId;

use super::apply::{Routed, Status, TxnCommand, TxnReply};
use crate::command::KvError;
use crate::router::{self, Router};
use crate::rpc::ExecError;
use crate::storage::txn_info::{Lock, PendingWrite, TxnId};

/// Wall-clock milliseconds: what lock expiries are written in.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What settling a lock came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The transaction may still commit; the lock stays.
    Pending,
    /// The transaction is over and the key finished (committed or rolled back).
    Finished,
}

/// Settles `lock`, found on `key`: asks its primary (aborting the
/// transaction there if the lock expired) and finishes the key if it is over.
pub async fn settle(router: &Router<'_>, key: &str, lock: &Lock, deadline: Instant) -> Result<Settled, ExecError> {
    let status = ask_primary(router, lock.txn, &lock.primary, lock.expires_ms, false, deadline).await?;
    let writes = match status {
        Status::Pending => return Ok(Settled::Pending),
        Status::Committed(w, ts) => Some((w, ts)),
        Status::Aborted => None,
    };
    let writes = writes.as_ref().map(|(w, ts)| (w.as_slice(), *ts));
    finish_keys(router, lock.txn, &[key.to_string()], writes, deadline).await?;
    Ok(Settled::Finished)
}

/// The outcome of `txn` (whose locks expire at `expires_ms`) at its
/// primary key `primary`: recorded there, or pending, or — the lock
/// expired, or `abort_if_pending` — aborted now.
pub async fn ask_primary(
    router: &Router<'_>,
    txn: TxnId,
    primary: &str,
    expires_ms: u64,
    abort_if_pending: bool,
    deadline: Instant,
) -> Result<Status, ExecError> {
    router::with_retries(router, deadline, || async move {
        let range = router.range_of(primary, deadline).await?;
        let primary = routed(primary, &range);
        let cmd = TxnCommand::Resolve { txn, primary, now_ms: now_ms(), expires_ms, abort_if_pending };
        match router.exec_txn(range.shard_id, cmd, 0, deadline).await? {
            TxnReply::Status(s) => Ok(s),
            other => Err(ExecError::Internal(format!("a txn resolve answered {other:?}"))),
        }
    })
    .await
}

/// Finishes `txn` on `keys`, wherever the directory routes them now:
/// commits them with `writes` at its commit timestamp (`Some`), or rolls
/// them back (`None`).
/// Keys no longer locked by `txn` are left alone, so this may be repeated.
pub async fn finish_keys(
    router: &Router<'_>,
    txn: TxnId,
    keys: &[String],
    writes: Option<(&[PendingWrite], crate::clock::Ts)>,
    deadline: Instant,
) -> Result<(), ExecError> {
    router::with_retries(router, deadline, || async move {
        for (shard, keys) in route_all(router, keys.iter().map(|k| (k.as_str(), ())), deadline).await? {
            let keys: Vec<Routed> = keys.into_iter().map(|(r, ())| r).collect();
            let (cmd, at) = match writes {
                Some((w, commit_ts)) => {
                    let mine = w.iter().filter(|w| keys.iter().any(|r| r.key == w.key)).cloned().collect();
                    (TxnCommand::Commit { txn, keys, writes: mine }, commit_ts)
                }
                None => (TxnCommand::Rollback { txn, keys }, 0),
            };
            router.exec_txn_at(shard, cmd, at, 0, deadline).await?;
        }
        Ok(())
    })
    .await
}

/// `key` as routed through `range`.
pub fn routed(key: &str, range: &cleave_metadata::RangeDescriptor) -> Routed {
    Routed { key: key.to_string(), range_id: range.range_id, epoch: range.epoch }
}

/// Routes `keys` (each with a tag) and groups them by shard, in key order.
pub async fn route_all<T>(
    router: &Router<'_>,
    keys: impl Iterator<Item = (&str, T)>,
    deadline: Instant,
) -> Result<BTreeMap<ShardId, Vec<(Routed, T)>>, ExecError> {
    let mut out: BTreeMap<ShardId, Vec<(Routed, T)>> = BTreeMap::new();
    for (key, tag) in keys {
        let range = router.range_of(key, deadline).await?;
        out.entry(range.shard_id).or_default().push((routed(key, &range), tag));
    }
    Ok(out)
}

/// Runs `attempt` until it succeeds or fails for a reason other than a lock:
/// a lock it meets is settled (see [`settle`]) and the attempt made again;
/// a pending one is waited for with backoff, until `deadline`. A
/// transaction step refused because its transaction was aborted
/// (`TxnAborted`: someone found it abandoned) is also made again.
pub async fn settling<T, F, Fut>(router: &Router<'_>, deadline: Instant, mut attempt: F) -> Result<T, ExecError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ExecError>>,
{
    let mut backoff = Duration::from_millis(5);
    loop {
        let wait = match attempt().await {
            Err(ExecError::Kv(KvError::Locked { key, lock })) => match settle(router, &key, &lock, deadline).await {
                Ok(Settled::Finished) => None,
                Ok(Settled::Pending) => Some(format!("key {key:?} is locked by a transaction still in progress")),
                Err(e) => return Err(ExecError::Unavailable(format!("key {key:?} is locked; settling its lock: {e}"))),
            },
            Err(ExecError::Kv(KvError::TxnAborted)) => Some("the transaction was aborted by another".to_string()),
            r => return r,
        };
        if let Some(why) = wait {
            if router::left(deadline) <= backoff + router::MIN_ATTEMPT {
                return Err(ExecError::Unavailable(why));
            }
            // Jittered, so that two transactions that keep meeting each
            // other's locks fall out of step.
            tokio::time::sleep(backoff.mul_f64(rand::random_range(0.5..1.5))).await;
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }
}
