//! Routing a key to the replica that can serve it.
//!
//! The API layer calls [`Node::write`], [`Node::read`] and [`Node::scan`]
//! with user keys. They look the key's range up in the directory, stamp the
//! command with the range's id and epoch, and execute it on the shard:
//! locally when this node leads the shard, otherwise forwarded (one RPC hop)
//! to the leader. A refusal that proves nothing was applied — a stale route
//! (421), no leader yet, a frozen range — is retried with backoff until the
//! write deadline; an answer whose outcome is unknown is never retried.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleave_metadata::{ShardId, META_GROUP};

use crate::command::{Command, CommandResponse, KvCommand, KvError, KvOp};
use crate::kv;
use crate::node::Node;
use crate::raft::{GroupRaft, ReadError, SmState, WriteError};
use crate::rpc::{ExecError, NodeReply, NodeRequest};

/// Forwarding hops allowed before giving up (a leader change in flight).
const MAX_HOPS: u8 = 3;
const HOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether retrying after `e` is safe and useful.
fn retryable(e: &ExecError) -> bool {
    matches!(
        e,
        ExecError::NoLeader { .. }
            | ExecError::Unavailable(_)
            | ExecError::Kv(KvError::WrongRange { .. } | KvError::RangeMoving)
    )
}

/// Retries `attempt` with backoff while it fails retryably, until `deadline`.
async fn with_retries<T, F, Fut>(node: &Node, deadline: Instant, mut attempt: F) -> Result<T, ExecError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ExecError>>,
{
    let mut backoff = Duration::from_millis(10);
    loop {
        match attempt().await {
            Err(e) if retryable(&e) && Instant::now() + backoff < deadline => {
                tracing::debug!("retrying after: {e}");
                match e {
                    // A stale route: learn the new directory and go at once.
                    ExecError::Kv(KvError::WrongRange { .. }) => {
                        metrics::counter!("cleave_router_stale_routes_total").increment(1);
                        node.refresh_directory().await
                    }
                    // A cutover in progress lasts milliseconds: poll closely.
                    ExecError::Kv(KvError::RangeMoving) => tokio::time::sleep(Duration::from_millis(2)).await,
                    _ => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
            }
            Err(e) if retryable(&e) => {
                return Err(match e {
                    ExecError::Kv(KvError::WrongRange { .. } | KvError::RangeMoving) | ExecError::NoLeader { .. } => {
                        ExecError::Unavailable(e.to_string())
                    }
                    e => e,
                })
            }
            r => return r,
        }
    }
}

impl Node {
    /// The range of `key`, fetching the directory first if this node has none yet.
    async fn route(&self, key: &str) -> Result<cleave_metadata::RangeDescriptor, ExecError> {
        self.refresh_directory().await;
        self.directory().lookup(key).cloned().ok_or(ExecError::Unavailable("directory not loaded yet".into()))
    }

    /// Writes one key through its shard's leader. Returns the new version.
    pub async fn write(&self, op: KvOp) -> Result<u64, ExecError> {
        let deadline = Instant::now() + self.settings.write_timeout;
        let key = match &op {
            KvOp::Put { key, .. } | KvOp::Delete { key, .. } => key.clone(),
        };
        let started = Instant::now();
        let mut shard_label = 0;
        let r = with_retries(self, deadline, || {
            let dir = self.directory();
            let op = op.clone();
            let range = dir.lookup(&key).cloned();
            if let Some(r) = &range {
                shard_label = r.shard_id;
            }
            let key = &key;
            async move {
                let range = match range {
                    Some(r) => r,
                    None => self.route(key).await?,
                };
                let cmd = KvCommand { range_id: range.range_id, epoch: range.epoch, op };
                self.exec_write(range.shard_id, cmd, 0).await
            }
        })
        .await;
        crate::metrics::record_request(shard_label, "write", started, r.is_ok());
        r
    }

    /// Reads one key. `linearizable` reads go through the shard leader.
    pub async fn read(&self, key: &str, linearizable: bool) -> Result<Option<(u64, String)>, ExecError> {
        let deadline = Instant::now() + self.settings.write_timeout;
        let started = Instant::now();
        let mut shard_label = 0;
        let r = with_retries(self, deadline, || {
            let range = self.directory().lookup(key).cloned();
            if let Some(r) = &range {
                shard_label = r.shard_id;
            }
            async move {
                let range = match range {
                    Some(r) => r,
                    None => self.route(key).await?,
                };
                self.exec_read(range.shard_id, key, linearizable, 0).await
            }
        })
        .await;
        crate::metrics::record_request(shard_label, "read", started, r.is_ok());
        r
    }

    /// Live items in `[start, end)` across ranges, in key order, at most
    /// `limit`. Returns the items and whether more may follow.
    pub async fn scan(
        &self,
        start: &str,
        end: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(String, u64, String)>, bool), ExecError> {
        let deadline = Instant::now() + self.settings.write_timeout;
        let mut out: Vec<(String, u64, String)> = Vec::new();
        let mut cursor = start.to_string();
        loop {
            if out.len() >= limit {
                return Ok((out, true));
            }
            if end.is_some_and(|e| cursor.as_str() >= e) {
                return Ok((out, false));
            }
            let want = limit - out.len();
            let cur = cursor.clone();
            let (items, range_end) = with_retries(self, deadline, || {
                let range = self.directory().lookup(&cur).cloned();
                let cur = cur.clone();
                async move {
                    let range = match range {
                        Some(r) => r,
                        None => self.route(&cur).await?,
                    };
                    let stop = match (&range.end, end) {
                        (Some(a), Some(b)) => Some(a.as_str().min(b).to_string()),
                        (Some(a), None) => Some(a.clone()),
                        (None, b) => b.map(str::to_string),
                    };
                    let items = self.exec_scan(range.shard_id, &cur, stop.as_deref(), want, 0).await?;
                    Ok((items, range.end.clone()))
                }
            })
            .await?;
            let got = items.len();
            out.extend(items);
            if got >= want {
                return Ok((out, true));
            }
            match range_end {
                Some(e) => cursor = e,
                None => return Ok((out, false)),
            }
        }
    }

    pub(crate) async fn forward(
        &self,
        group: ShardId,
        hops: u8,
        leader: Option<u64>,
        req: impl Fn(u8) -> NodeRequest,
    ) -> Result<NodeReply, ExecError> {
        if hops >= MAX_HOPS {
            return Err(ExecError::NoLeader { group });
        }
        let targets: Vec<String> = match leader.filter(|n| *n != self.id).and_then(|n| self.raft_addr_of(n)) {
            Some(addr) => vec![addr],
            None => self.candidates(group),
        };
        let mut last = ExecError::NoLeader { group };
        for addr in targets {
            match self.call(&addr, req(hops + 1), HOP_TIMEOUT).await {
                Err(e @ ExecError::Unavailable(_)) => last = e,
                r => return r,
            }
        }
        Err(last)
    }

    /// Proposes `cmd` to this node's replica of `group`. `Ok(Ok(..))`: it
    /// was applied here; `Ok(Err(leader))`: this node does not lead the group
    /// (or has no replica) and the request belongs at `leader`, if known.
    pub(crate) async fn propose_here(
        &self,
        group: u64,
        cmd: Command,
        timeout: Duration,
    ) -> Result<Result<(Arc<GroupRaft>, CommandResponse), Option<u64>>, ExecError> {
        let Some(g) = self.group(group) else { return Ok(Err(None)) };
        match tokio::time::timeout(timeout, g.write(cmd)).await {
            Err(_) => Err(ExecError::Timeout(format!("entry for group {group} not applied in time"))),
            Ok(Ok(resp)) => Ok(Ok((g, resp))),
            Ok(Err(WriteError::NotLeader { leader: Some(l) })) if l.node_id != self.id => Ok(Err(Some(l.node_id))),
            Ok(Err(WriteError::NotLeader { .. })) => Err(ExecError::NoLeader { group }),
            Ok(Err(WriteError::Indeterminate(m))) => Err(ExecError::Indeterminate(m)),
            // The replica was stopped under the write because it was removed
            // (a move's source, a GC'd leftover): openraft cannot tell whether
            // the entry reached the log first, so the outcome is unknown (as
            // with a leader change), and the client retries elsewhere.
            Ok(Err(WriteError::Fatal(m))) if self.was_removed(group, &g) => {
                Err(ExecError::Indeterminate(format!("replica of group {group} removed during the write ({m})")))
            }
            Ok(Err(WriteError::Fatal(m))) => Err(ExecError::Internal(m)),
        }
    }

    /// Whether `g`, a replica of `group` this node held, has since been
    /// removed from it (stopped and deleted, or replaced by a newer replica).
    fn was_removed(&self, group: u64, g: &Arc<GroupRaft>) -> bool {
        self.group(group).is_none_or(|cur| !Arc::ptr_eq(&cur, g))
    }

    /// Executes a write on `shard`: here if this node leads it, else at the leader.
    pub async fn exec_write(&self, shard: ShardId, cmd: KvCommand, hops: u8) -> Result<u64, ExecError> {
        let leader = match self.propose_here(shard, Command::Kv(cmd.clone()), self.settings.write_timeout).await? {
            Ok((g, CommandResponse::Kv(r))) => {
                self.sample_key(&g, cmd.key());
                g.served.fetch_add(1, Ordering::Relaxed);
                return r.map_err(ExecError::Kv);
            }
            Ok((_, other)) => return Err(ExecError::Internal(format!("unexpected response {other:?}"))),
            Err(leader) => leader,
        };
        match self.forward(shard, hops, leader, |hops| NodeRequest::KvWrite { shard, cmd: cmd.clone(), hops }).await? {
            NodeReply::Written(v) => Ok(v),
            other => Err(ExecError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Checks that this replica's shard owns all of `[start, end)`; a point
    /// read of `key` passes `start = end = key`.
    fn check_owned(g: &GroupRaft, start: &str, end: Option<&str>) -> Result<(), ExecError> {
        let state = g.state.read().unwrap();
        let SmState::Shard(s) = &*state else { return Err(ExecError::Internal("not a shard".into())) };
        let covers = |r: &cleave_metadata::RangeDescriptor| match (&r.end, end) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(re), Some(e)) => e <= re.as_str(),
        };
        match s.owner(start) {
            Some(r) if covers(r) => Ok(()),
            _ => Err(ExecError::Kv(KvError::WrongRange { ranges: s.ranges.clone() })),
        }
    }

    /// Executes a read on `shard`, locally when allowed, else at the leader.
    pub async fn exec_read(
        &self,
        shard: ShardId,
        key: &str,
        linearizable: bool,
        hops: u8,
    ) -> Result<Option<(u64, String)>, ExecError> {
        let leader = match self.group(shard) {
            Some(g) => {
                let barrier = if linearizable { self.barrier(&g, shard).await } else { Ok(()) };
                match barrier {
                    Ok(()) => {
                        self.sample_key(&g, key);
                        g.served.fetch_add(1, Ordering::Relaxed);
                        Self::check_owned(&g, key, Some(key))?;
                        let rec = kv::read(&self.ctx.db, shard, key).map_err(|e| ExecError::Internal(e.to_string()))?;
                        // A replica removed meanwhile may have had its data
                        // deleted under the read (removal from the map comes
                        // first): ask the group's leader instead.
                        if self.was_removed(shard, &g) {
                            None
                        } else {
                            return Ok(rec
                                .filter(|r| !r.tombstone)
                                .map(|r| (r.version, String::from_utf8_lossy(&r.json).into_owned())));
                        }
                    }
                    Err(Some(l)) => Some(l),
                    Err(None) if self.was_removed(shard, &g) => None,
                    Err(None) => return Err(ExecError::NoLeader { group: shard }),
                }
            }
            None => None,
        };
        let key = key.to_string();
        match self
            .forward(shard, hops, leader, |hops| NodeRequest::KvRead { shard, key: key.clone(), linearizable, hops })
            .await?
        {
            NodeReply::Read(r) => Ok(r),
            other => Err(ExecError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Confirms leadership for a linearizable read. `Err(Some(node))` names
    /// the leader to forward to; `Err(None)` means no leader is known.
    pub(crate) async fn barrier(&self, g: &crate::raft::GroupRaft, shard: ShardId) -> Result<(), Option<u64>> {
        match tokio::time::timeout(self.settings.write_timeout, g.read_barrier()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(ReadError::NotLeader { leader: Some(l) })) if l.node_id != self.id => Err(Some(l.node_id)),
            Ok(Err(e)) => {
                tracing::debug!(shard, "read barrier: {e}");
                Err(None)
            }
            Err(_) => Err(None),
        }
    }

    /// Scans `[start, end)` of `shard` at its leader.
    pub async fn exec_scan(
        &self,
        shard: ShardId,
        start: &str,
        end: Option<&str>,
        limit: usize,
        hops: u8,
    ) -> Result<Vec<(String, u64, String)>, ExecError> {
        let leader = match self.group(shard) {
            Some(g) => match self.barrier(&g, shard).await {
                Ok(()) => {
                    g.served.fetch_add(1, Ordering::Relaxed);
                    Self::check_owned(&g, start, end)?;
                    let items = kv::scan(&self.ctx.db, shard, start, end, limit)
                        .map_err(|e| ExecError::Internal(e.to_string()))?;
                    if self.was_removed(shard, &g) {
                        None // as for a point read: the data may have gone under the scan
                    } else {
                        return Ok(items
                            .into_iter()
                            .map(|i| (i.key, i.record.version, String::from_utf8_lossy(&i.record.json).into_owned()))
                            .collect());
                    }
                }
                Err(Some(l)) => Some(l),
                Err(None) if self.was_removed(shard, &g) => None,
                Err(None) => return Err(ExecError::NoLeader { group: shard }),
            },
            None => None,
        };
        let (start, end) = (start.to_string(), end.map(str::to_string));
        match self
            .forward(shard, hops, leader, |hops| NodeRequest::KvScan {
                shard,
                start: start.clone(),
                end: end.clone(),
                limit,
                hops,
            })
            .await?
        {
            NodeReply::Scanned(items) => Ok(items),
            other => Err(ExecError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Proposes a directory change through the metadata leader.
    pub async fn propose_meta(
        &self,
        cmd: cleave_metadata::MetaCommand,
        hops: u8,
    ) -> Result<cleave_metadata::MetaResponse, ExecError> {
        let leader =
            match self.propose_here(META_GROUP, Command::Meta(cmd.clone()), self.settings.write_timeout).await? {
                Ok((_, CommandResponse::Meta(r))) => return r.map_err(ExecError::Meta),
                Ok((_, other)) => return Err(ExecError::Internal(format!("unexpected response {other:?}"))),
                Err(leader) => leader,
            };
        match self.forward(META_GROUP, hops, leader, |hops| NodeRequest::MetaPropose { cmd: cmd.clone(), hops }).await?
        {
            NodeReply::Meta(r) => Ok(r),
            other => Err(ExecError::Internal(format!("unexpected reply {other:?}"))),
        }
    }
}
